#!/usr/bin/env python3
"""ctest `skills`: every docs/skills/<name>/SKILL.md has its front matter, every `pithtrain` command in its
fenced shell blocks is a real command whose flags that command's --help lists, every script it runs
exists, and every repository path it names in backticks exists. And every fenced block marked runnable
(info string `bash runnable`) in README.md, AGENTS.md and docs/**/*.md runs and exits 0: in a fresh
scratch folder that links the checkout's top-level entries (configs/, scripts/, ...) and its build
(build/ -> the build holding PITHTRAIN_BIN), so a block may write data/ or runs/ there, and the
checkout is left as it was. Args: PITHTRAIN_BIN SOURCE_DIR"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

binary, source = sys.argv[1], Path(sys.argv[2]).resolve()
skills = sorted((source / "docs" / "skills").glob("*/SKILL.md"))
problems, commands_checked, paths_checked = [], 0, 0
help_cache = {}


def help_text(subcommand):
    if subcommand not in help_cache:
        result = subprocess.run([binary, *subcommand.split(), "--help"], capture_output=True, text=True)
        help_cache[subcommand] = (result.returncode, result.stdout + result.stderr)
    return help_cache[subcommand]


for skill in skills:
    where = skill.relative_to(source)
    text = skill.read_text()
    front = re.match(r"---\nname: (.+)\ndescription: (.+)\n---\n", text)
    if front is None:
        problems.append(f"{where}: no front matter (--- / name: / description: / ---)")
    elif front.group(1).strip() != skill.parent.name:
        problems.append(f"{where}: name '{front.group(1)}' differs from its folder '{skill.parent.name}'")
    elif not front.group(2).strip().endswith("."):
        problems.append(f"{where}: the description should be one sentence")
    for block in re.findall(r"```(?:bash|sh)(?: runnable)?\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line, comments=True)
            for index, word in enumerate(words):
                if word.endswith("bin/pithtrain") or word == "pithtrain":
                    rest = words[index + 1:]
                    subcommand = ""
                    if rest and rest[0] in ("plugins", "explain", "plot", "launch", "eval", "generate"):
                        subcommand = rest[0]
                    elif rest and rest[0] in ("plugin", "data", "convert"):
                        subcommand = rest[0]
                    code, usage = help_text(subcommand)
                    commands_checked += 1
                    if code != 0:
                        problems.append(f"{where}: `pithtrain {subcommand} --help` exits {code}")
                    checks = [(subcommand, rest)]
                    if subcommand == "launch" and "--" in rest:  # after `--`: the training arguments
                        split = rest.index("--")
                        checks = [("launch", rest[:split]), ("", rest[split + 1:])]
                    for checked, words_to_check in checks:
                        usage = help_text(checked)[1]
                        for flag in [w.split("=")[0] for w in words_to_check if w.startswith("--") and w != "--"]:
                            if flag not in usage:
                                problems.append(f"{where}: `{line}` uses {flag}, which `pithtrain {checked} --help` does not list")
                elif word.startswith("scripts/") or word.startswith("tests/parity/"):
                    paths_checked += 1
                    if not (source / word).exists():
                        problems.append(f"{where}: `{line}` runs {word}, which does not exist")
                    if word == "scripts/run.sh":  # its flags go to pithtrain
                        code, usage = help_text("")
                        for flag in [w.split("=")[0] for w in words[index + 1:] if w.startswith("--")]:
                            if flag not in usage:
                                problems.append(f"{where}: `{line}` passes {flag}, which `pithtrain --help` does not list")
    for path in re.findall(r"`((?:core|plugins|docs|configs|tests|scripts|ate_bench)/[\w./-]+)`", text):
        if re.search(r"[A-Z]{3,}|NAME|ARCH", path):  # a placeholder such as plugins/router/NAME
            continue
        paths_checked += 1
        if not (source / path.rstrip("/")).exists():
            problems.append(f"{where}: names `{path}`, which does not exist")

required = {"add-a-router", "add-an-attention-variant", "add-an-optimizer", "add-a-model", "validate-correctness",
            "profile-a-run", "collect-routing-trace", "estimate-memory", "launch-multi-process", "convert-checkpoint",
            "debug-a-plugin-that-will-not-load"}
missing = required - {skill.parent.name for skill in skills}
agents = (source / "AGENTS.md").read_text()
for skill in skills:
    if f"`{skill.parent.name}`" not in agents:
        problems.append(f"AGENTS.md does not point to the skill `{skill.parent.name}`")
if not (source / ".claude" / "skills").resolve() == (source / "docs" / "skills").resolve():
    problems.append(".claude/skills does not lead to docs/skills")
if missing:
    problems.append(f"missing skills: {', '.join(sorted(missing))}")
# Runnable blocks: ```bash runnable ... ``` (AGENTS.md names the marker).
build_dir = Path(binary).resolve().parent.parent
documents = [source / "README.md", source / "AGENTS.md", *sorted((source / "docs").rglob("*.md"))]
runnable = [(document, block) for document in documents
            for block in re.findall(r"^```bash runnable\n(.*?)^```", document.read_text(), re.DOTALL | re.MULTILINE)]
for document in (source / "README.md", source / "AGENTS.md"):  # their quick commands are checked by running them
    if not any(found == document for found, _ in runnable):
        problems.append(f"{document.relative_to(source)}: no `bash runnable` block (its quick commands should be one)")
for document, block in runnable:
    where = document.relative_to(source)
    scratch = Path(tempfile.mkdtemp(prefix="pithtrain_runnable_"))
    for entry in source.iterdir():
        if entry.name not in ("build", ".git", "data", "runs"):
            (scratch / entry.name).symlink_to(entry)
    (scratch / "build").symlink_to(build_dir)
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=scratch, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PITHTRAIN_ATE_LEDGER": ""})
        if result.returncode != 0:
            problems.append(f"{where}: a runnable block exits {result.returncode}:\n{block}"
                            f"--- output:\n{(result.stdout + result.stderr)[-2000:]}")
    except subprocess.TimeoutExpired:
        problems.append(f"{where}: a runnable block ran over 300 s (runnable blocks must be quick):\n{block}")
    shutil.rmtree(scratch, ignore_errors=True)

print(f"{len(skills)} skills, {commands_checked} pithtrain commands checked against --help, {paths_checked} paths checked; "
      f"{len(runnable)} runnable blocks run")
for problem in problems:
    print("FAIL:", problem)
sys.exit(1 if problems else 0)
