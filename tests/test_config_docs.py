#!/usr/bin/env python3
"""ctest `config_docs`: docs/config.md cannot go stale. It fails when a key the code reads is not documented,
is documented with another default, or is documented but read nowhere; plugin keys included.

Where the keys come from: tests/config_keys.cpp builds a real Trainer on a config holding only the
required keys, once per installed plugin of each kind (and with YaRN per attention plugin, and once per
required key left out), and writes each probe's resolved config (every key read, with the default it
took). That is robust where a source grep is not: keys are read by the core and by plugins, through
helpers, with computed defaults. Keys read only in a layout one process cannot build (e.g.
parallel.pipeline_units, read when parallel.pipeline > 1) are never in a probe; a documented key counts as
read when an Options reader call with its name (`.integer("pipeline_units"`) appears in core/src or in
the plugin's folder, and every such call's key must be documented somewhere.

How the docs are read: markdown tables whose header row has a `key` and a `default` column (found by
name, so more columns, e.g. `range`, may come anywhere); the TOML table they document is the `[a.b]` in
the nearest heading above. A heading that also says `plugin = "NAME"` (one or more) limits its table to
those plugins of that table's kind. A plugin that docs/config.md gives no table of its own is checked
against the key table in its README.md instead, so a new plugin folder needs no edit outside itself; a
README's rows are checked (read, defaults) either way. Defaults: a cell holding one backticked TOML
value (`0.05`, `"gqa"`, `true`, `[]`) is compared with the default the code took (numbers to 1e-9
relative); `required` must be a key whose absence is an error; any other cell (words, a formula such as
`lr / 10`) documents a derived default and is not compared.
Args: CONFIG_KEYS_BIN SOURCE_DIR"""
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

probe_binary, source = sys.argv[1], Path(sys.argv[2])
problems = []

# ---- what the code reads ----------------------------------------------------------------------------

with tempfile.TemporaryDirectory() as scratch:
    out = Path(scratch) / "keys.json"
    result = subprocess.run([probe_binary, scratch], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL: {probe_binary} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    probed = json.loads(out.read_text())
kind_tables = probed["kind_tables"]  # kind -> the table its plugin key and the plugin's keys live in
table_kinds = {table: kind for kind, table in kind_tables.items()}


def flatten(table, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; arrays are values."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def split_key(dotted):
    table, _, key = dotted.rpartition(".")
    return table, key


# reads[(table, key)] = [(probe name, the plugin of that table in the probe or None, default or None if set)]
reads = {}
required_errors = {}  # dotted key -> the error its absence gave
for probe in probed["probes"]:
    left_out = probe["name"][len("without "):] if probe["name"].startswith("without ") else None
    if left_out and f"missing required key '{left_out}'" in probe["error"]:
        required_errors[left_out] = probe["error"]
    elif probe["error"]:
        if probe["optional"] and "unknown key" in probe["error"]:
            continue  # this plugin does not take the probed switch (e.g. no rotary embedding)
        problems.append(f"probe '{probe['name']}' could not build a Trainer: {probe['error']}")
    given = flatten(tomllib.loads(probe["config"]))
    resolved = flatten(tomllib.loads(probe["resolved"]))
    for dotted, value in resolved.items():
        table, key = split_key(dotted)
        plugin = resolved.get(f"{table}.plugin") if table in table_kinds else None
        reads.setdefault((table, key), []).append((probe["name"], plugin, None if dotted in given else value))

# ---- what the docs say ------------------------------------------------------------------------------


def cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def doc_rows(path, fixed_table=None, fixed_plugins=None):
    """(table, plugins or None, key, default cell, 'file:line') for every row of a key/default table."""
    rows, table, plugins = [], fixed_table, fixed_plugins
    lines = path.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#") and fixed_table is None:
            found = re.search(r"`\[([\w.]+)\]`", line)
            table = found.group(1) if found else None
            named = re.findall(r'plugin = "(\w+)"', line)
            plugins = frozenset(named) if named else None
        if line.startswith("|") and index + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|?$", lines[index + 1].strip()):
            header = [cell.lower() for cell in cells(line)]
            index += 2
            if "key" in header and "default" in header:
                key_column, default_column = header.index("key"), header.index("default")
                while index < len(lines) and lines[index].startswith("|"):
                    row = cells(lines[index])
                    where = f"{path.relative_to(source)}:{index + 1}"
                    key_cell = row[key_column] if len(row) > key_column else ""
                    default_cell = row[default_column] if len(row) > default_column else ""
                    # One key, or several sharing a row ("`a`, `b`" with defaults "`1`, `2`" or one for all).
                    names = re.findall(r"`(\w+)`", key_cell) if re.fullmatch(r"`\w+`(\s*,\s*`\w+`)*", key_cell) else []
                    defaults = [d.strip() for d in default_cell.split(",")]
                    if len(defaults) != len(names):
                        defaults = [default_cell] * len(names)
                    if table is None:
                        problems.append(f"{where}: a key table under a heading without a `[table]`")
                    elif not names:
                        problems.append(f"{where}: the key cell should be backticked keys, got {key_cell!r}")
                    for name, default in zip(names, defaults):
                        rows.append((table, plugins, name, default, where))
                    index += 1
            continue
        index += 1
    return rows


config_rows = doc_rows(source / "docs" / "config.md")
installed = {(p["kind"], p["name"]) for p in probed["plugins"]}
readme_rows = {}  # (table, plugin) -> rows of the plugin's README
for kind, name in installed:
    readme = source / "plugins" / kind / name / "README.md"
    if readme.exists():
        readme_rows[(kind_tables[kind], name)] = doc_rows(readme, kind_tables[kind], frozenset([name]))
config_tables_of_plugins = {(table, plugin) for table, plugins, *_ in config_rows if plugins for plugin in plugins}

for table, plugin in sorted(config_tables_of_plugins):
    where = next(row[4] for row in config_rows if row[0] == table and row[1] and plugin in row[1])
    if table not in table_kinds:
        problems.append(f"{where}: `plugin = \"{plugin}\"` in a heading of [{table}], which no plugin kind owns")
    elif (table_kinds[table], plugin) not in installed:
        problems.append(f"{where}: documents {table_kinds[table]} plugin '{plugin}', which is not installed "
                        f"(plugins/{table_kinds[table]}/{plugin}/ gone?); remove or rename its table")


def documentation_of(table, key, plugin):
    """The doc rows that document `key` of [table] for `plugin` (None: a table no plugin owns)."""
    found = [row for row in config_rows if row[0] == table and row[2] == key and (row[1] is None or plugin in row[1])]
    if not found and plugin is not None and (table, plugin) not in config_tables_of_plugins:
        found = [row for row in readme_rows.get((table, plugin), []) if row[2] == key]
    return found


# ---- compare ----------------------------------------------------------------------------------------


def literal(cell):
    """The TOML value a default cell holds, or None when it documents the default in words."""
    found = re.fullmatch(r"`([^`]+)`", cell.strip())
    if not found:
        return None
    try:
        return tomllib.loads(f"v = {found.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return None  # `num_heads`, `4 * hidden_size`: a derived default


def same(documented, actual):
    numbers = (int, float)
    if isinstance(documented, numbers) and isinstance(actual, numbers) and not isinstance(documented, bool) \
            and not isinstance(actual, bool):
        return abs(documented - actual) <= 1e-9 * max(1.0, abs(documented))
    return documented == actual


reported = set()  # (file:line, key): one message per documented default, from the first probe that shows it


def check_default(row, value, probe):
    table, _, key, cell, where = row
    if value is None or (where, key) in reported:
        return  # the probe set this key (no default to compare), or this row is already reported
    if cell.strip().lower() == "required":
        reported.add((where, key))
        problems.append(f"{where}: {table}.{key} is documented as required but took the default {value!r}")
    expected = literal(cell)
    if expected is not None and not same(expected, value):
        reported.add((where, key))
        problems.append(f"{where}: {table}.{key} is documented with default {cell} but the code's default is "
                        f"{json.dumps(value)} (probe '{probe}')")


for (table, key), seen in sorted(reads.items()):
    for probe, plugin, value in seen:
        rows = documentation_of(table, key, plugin)
        if not rows:
            place = f"docs/config.md [{table}]" + (f" (or plugins/{table_kinds[table]}/{plugin}/README.md)" if plugin else "")
            problems.append(f"{table}.{key} is read (probe '{probe}') but not documented in {place}")
            break
        for row in rows:
            check_default(row, value, probe)
        # A plugin's README documents the same key: its default must agree too.
        for row in readme_rows.get((table, plugin), []) if plugin else []:
            if row[2] == key and row not in rows:
                check_default(row, value, probe)

# Keys read only in layouts no probe builds: an Options reader call with the key's name.
reader = re.compile(r'\.(?:number|integer|boolean|text|text_list|required_number|required_integer|required_text|has)'
                    r'\(\s*"(\w+)"')


def reader_keys(files):
    return {name for file in files for name in reader.findall(file.read_text(errors="replace"))}


core_files = [f for f in (source / "core").rglob("*") if f.suffix in (".cpp", ".h")]
core_keys = reader_keys(core_files)
plugin_keys = {(kind_tables[kind], name): reader_keys([f for f in (source / "plugins" / kind / name).glob("*.cpp")
                                                          if not f.name.startswith("test_")])
               for kind, name in installed}


def read_somewhere(table, key, plugins):
    if any(probe_plugin is None or plugins is None or probe_plugin in plugins for _, probe_plugin, _ in reads.get((table, key), [])):
        return True
    if key in core_keys:
        return True
    return any(key in plugin_keys.get((table, plugin), set()) for plugin in (plugins or
               [name for kind, name in installed if kind_tables[kind] == table]))


all_rows = config_rows + [row for rows in readme_rows.values() for row in rows]
for table, plugins, key, cell, where in all_rows:
    if not read_somewhere(table, key, plugins):
        problems.append(f"{where}: {table}.{key} is documented but no code reads it"
                        + (f" (plugin {', '.join(sorted(plugins))})" if plugins else ""))
    if cell.strip().lower() == "required" and f"{table}.{key}" not in required_errors:
        problems.append(f"{where}: {table}.{key} is documented as required, but a config without it is not refused "
                        "(or config_keys.cpp's minimal config does not hold it)")
for dotted, error in required_errors.items():
    if not any(f"{row[0]}.{row[2]}" == dotted and row[3].strip().lower() == "required" for row in config_rows):
        problems.append(f"{dotted} is required ({error}) but docs/config.md does not say `required`")

documented_names = {row[2] for row in all_rows}
for name in sorted(core_keys | set().union(*plugin_keys.values())):
    if name not in documented_names:
        problems.append(f"key '{name}' is read in the source (an Options reader call) but documented nowhere")

print(f"{len(config_rows)} rows in docs/config.md, {sum(len(r) for r in readme_rows.values())} in plugin READMEs; "
      f"{len(probed['probes'])} probes over {len(installed)} plugins read {len(reads)} keys")
for problem in dict.fromkeys(problems):  # once each, in the order found
    print("FAIL:", problem)
sys.exit(1 if problems else 0)
