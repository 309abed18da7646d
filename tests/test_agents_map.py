#!/usr/bin/env python3
"""AGENTS.md's map stays true: every `file` with a `function` named in its tables exists and defines it.

A row names a file in backticks and then a function (`name` or `Class::method`) in a later cell, or
"`Class::method` in `file`" in one cell; each named function must be defined in the named file.
Usage: test_agents_map.py SOURCE_DIR
"""
import pathlib
import re
import sys

source = pathlib.Path(sys.argv[1])
text = (source / "AGENTS.md").read_text()
start = text.find("## Map: where each thing lives")
if start < 0:
    sys.exit("AGENTS.md has no '## Map: where each thing lives' section")
section = text[start:]
next_section = re.search(r"\n## ", section[3:])
section = section[: next_section.start() + 3] if next_section else section

FILE = re.compile(r"`((?:core|plugins|kernels|tests|scripts)/[^`]+?\.(?:cpp|h|cu|py|sh))`")
FUNCTION = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)?)`")


def defined(path: pathlib.Path, function: str) -> bool:
    """Whether `path` holds a definition (a body, not only a declaration) of `function`."""
    code = path.read_text()
    if "::" in function:
        owner, name = function.split("::")
        # A definition out of the class (Owner::name(...)) or inside it (struct/class Owner { ... name(...) {).
        if re.search(rf"\b{owner}::{name}\s*\(", code):
            return True
        body = re.search(rf"\b(?:struct|class)\s+{owner}\b[^;]*?\{{(.*?)\n}};", code, re.S)
        return bool(body and re.search(rf"\b{name}\s*\([^;]*?\)\s*(?:const\s*)?(?:override\s*)?\{{", body.group(1), re.S))
    return bool(re.search(rf"^[^\n]*\b{function}\s*\([^;]*?\)\s*(?:const\s*)?\{{", code, re.M | re.S))


checked, failures = 0, []
for line in section.splitlines():
    pairs = []
    # "`Class::method` in `file`" anywhere in a line.
    for match in re.finditer(r"`([A-Za-z_][\w]*(?:::[\w]+)?)` in `([^`]+)`", line):
        pairs.append((match.group(2), match.group(1)))
    if line.startswith("|"):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for index, cell in enumerate(cells):
            file_match = FILE.fullmatch(cell)
            if not file_match or file_match.group(1).endswith(".h") and index + 1 >= len(cells):
                continue
            for later in cells[index + 1:]:
                function = FUNCTION.fullmatch(later)
                if function:
                    pairs.append((file_match.group(1), function.group(1)))
                    break
    for file_name, function in pairs:
        if "/" not in file_name:
            continue
        checked += 1
        path = source / file_name
        if not path.exists():
            failures.append(f"AGENTS.md names {file_name}, which does not exist")
        elif not defined(path, function):
            failures.append(f"AGENTS.md says {function} is in {file_name}, but no definition of it is there")
for failure in failures:
    print("FAIL:", failure)
print(f"{checked - len(failures)} passed, {len(failures)} failed")
sys.exit(1 if failures or checked < 20 else 0)
