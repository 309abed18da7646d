"""Helpers for ATE-Bench acceptance checks: read what the agent wrote and what its runs left, and fail
with a message that says which fact is missing. A check exits 0 when the task is done right."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

WORK = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ATE_WORK", ".")).resolve()
REPO = Path(os.environ.get("ATE_REPO", Path(__file__).resolve().parents[3]))
# The benchmarked checkout's build folder (scripts/build.sh honours the same variable).
BUILD = REPO / os.environ.get("PITHTRAIN_BUILD_DIR", "build")
_problems = []


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def problem(message):
    """Records a failed requirement; finish() fails when any were recorded."""
    _problems.append(message)
    print(f"  missing: {message}")


def finish(what="task"):
    if _problems:
        fail(f"{len(_problems)} requirement(s) of the {what} not met")
    print(f"PASS: {what}")
    sys.exit(0)


def read_text(name):
    path = WORK / name
    if not path.exists():
        fail(f"{name} was not written in {WORK}")
    return path.read_text(errors="replace")


def require(text, pattern, fact):
    """Requires a regular expression (case-insensitive, . matches newlines) to occur in text."""
    if re.search(pattern, text, re.IGNORECASE | re.DOTALL) is None:
        problem(f"{fact} (pattern {pattern!r})")


def reported_number(text, label):
    """The number written after `label` (a regex) on the same line, e.g. 'final loss: 2.01'."""
    match = re.search(label + r"[^0-9\-\n]*(-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)", text, re.IGNORECASE)
    if match is None:
        fail(f"no number after '{label}' in the report")
    return float(match.group(1))


def reported_word(text, label):
    match = re.search(label + r"\s*[:=]?\s*`?([A-Za-z0-9_:./\-]+)`?", text, re.IGNORECASE)
    if match is None:
        fail(f"nothing after '{label}' in the report")
    return match.group(1)


def metrics(run_dir):
    path = WORK / run_dir / "metrics.jsonl"
    if not path.exists():
        fail(f"{run_dir}/metrics.jsonl does not exist: the run was not made there")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def smoothed_losses(rows):
    """The trainer's smoothing: an exponential moving average (0.9) of the cross-entropy of every step."""
    smoothed, result = None, {}
    for row in rows:
        if "cross_entropy" not in row:
            continue
        value = row["cross_entropy"]
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        result[row["step"]] = smoothed
    return result


def toml(path):
    import tomllib
    with open(WORK / path, "rb") as file:
        return tomllib.load(file)


def core_unchanged():
    status = subprocess.run(["git", "-C", str(WORK), "status", "--porcelain", "--", "core"], capture_output=True, text=True)
    if status.stdout.strip():
        fail("core/ was modified (an extension must be a plugin folder only):\n" + status.stdout)


def pithtrain():
    """The pithtrain of the benchmarked checkout's own build (built once if missing)."""
    binary = BUILD / "bin" / "pithtrain"
    if not binary.exists():
        print(f"building {REPO} once for the checks (scripts/build.sh)", flush=True)
        subprocess.run(["bash", str(REPO / "scripts" / "build.sh")], check=True, stdout=subprocess.DEVNULL)
    return binary
