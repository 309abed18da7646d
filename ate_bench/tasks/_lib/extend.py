"""The shared acceptance check of extend tasks: core/ untouched, the plugin folder builds on its own
against the benchmarked checkout's SDK, passes `pithtrain plugin check`, passes the task's hidden numeric
test against an independent reference of the published formula, and trains the tiny model."""
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path

from atecheck import BUILD, WORK, core_unchanged, fail, finish, pithtrain, problem

TASK_DIR = Path(os.environ.get("ATE_TASK_DIR", Path(__file__).resolve().parent))
LIB = Path(__file__).resolve().parent


def run(command, what, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        fail(f"{what} failed (exit {result.returncode}):\n{output[-4000:]}")
    return output


def check_extension(kind, name, config_key, train_sets=(), min_loss_drop=0.1):
    core_unchanged()
    folder = WORK / "plugins" / kind / name
    for needed in ("plugin.cpp", f"{name}.cpp", "CMakeLists.txt", "README.md"):
        if not (folder / needed).exists():
            fail(f"plugins/{kind}/{name}/{needed} is missing (one plugin = one folder: plugin.cpp, {name}.cpp, "
                 "CMakeLists.txt, README.md)")
    binary = pithtrain()
    cache = (BUILD / "CMakeCache.txt").read_text()
    torch_dir = re.search(r"^Torch_DIR:PATH=(.*)$", cache, re.MULTILINE).group(1)
    scratch = Path(tempfile.mkdtemp(prefix=f"ate-{name}-"))
    (scratch / "CMakeLists.txt").write_text(f"""cmake_minimum_required(VERSION 3.22)
project(ate_extend_check LANGUAGES CXX)
set(CMAKE_CXX_STANDARD 20)
find_package(PithTrain REQUIRED)
add_subdirectory({folder} plugin)
add_executable(hidden_test {TASK_DIR / 'hidden_test.cpp'})
target_include_directories(hidden_test PRIVATE {LIB})
target_link_libraries(hidden_test PRIVATE pithtrain::core ${{CMAKE_DL_LIBS}})
""")
    build = scratch / "build"
    print(f"building plugins/{kind}/{name} and the hidden test against {BUILD}", flush=True)
    run(["cmake", "-S", scratch, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", f"-DPithTrain_DIR={BUILD}",
         f"-DTorch_DIR={torch_dir}", "-Wno-dev"], "configuring the plugin build")
    run(["cmake", "--build", build], "building the plugin")
    plugin = build / f"{kind}_{name}.so"
    if not plugin.exists():
        fail(f"the build made no {plugin.name}: the folder's CMakeLists.txt should call pithtrain_add_plugin()")
    print(run([binary, "plugin", "check", plugin], "pithtrain plugin check (the conformance suite)").splitlines()[-1])
    print(run([build / "hidden_test", plugin], "the hidden numeric test"))
    tokens = scratch / "tokens"
    run([binary, "data", "build", "--format", "fortune", "--out", tokens, "/usr/share/games/fortunes/literature"], "making data")
    command = [binary, "--config", LIB / "extend_check.toml", "--plugins", plugin, "--set", f"{config_key}={name}",
               "--set", f'data.path="{tokens}"', "--set", "train.steps=12", "--set", "train.warmup_steps=0",
               "--set", "train.seq_len=64", "--set", "eval.batches=1", "--set", "checkpoint.every=0", "--out", scratch / "run"]
    for assignment in train_sets:
        command += ["--set", assignment]
    run(command, "training the tiny model with the plugin")
    rows = [json.loads(line) for line in (scratch / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["cross_entropy"], rows[-1]["cross_entropy"]
    print(f"tiny model with {name}: cross-entropy {first:.3f} at step 1 -> {last:.3f} at step {rows[-1]['step']}")
    if not all(math.isfinite(r["loss"]) for r in rows):
        problem("the training loss is not finite")
    elif last > first - min_loss_drop:
        problem(f"the tiny model did not learn with the plugin: {first:.3f} -> {last:.3f} in 12 steps")
    finish(f"extension {kind}/{name}")
