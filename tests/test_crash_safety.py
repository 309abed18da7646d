#!/usr/bin/env python3
"""SIGKILL at many points of a training run, several of them inside a checkpoint write: after each
kill the plain rerun of the same command resumes from the newest complete checkpoint, and the run
ends with every step's losses and the final weights identical to an uninterrupted run.

Args: PITHTRAIN_BIN FORTUNES_DIR. The config is written here (never configs/*.toml)."""
import json
import struct
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 12
# Large enough that a checkpoint (master weights and two AdamW moments, about 8 MB) takes a
# measurable time to write (it is fsynced), small enough that a step takes a few tens of milliseconds.
CONFIG = """
[data]
path = "{data}"
validation_fraction = 0.05

[model]
vocab_size = 257
hidden_size = 128
num_layers = 2
num_heads = 4
num_kv_heads = 2
first_dense_layers = 1
dense_hidden_size = 256

[model.attention]
plugin = "gqa"

[model.moe]
num_experts = 8
top_k = 2
expert_hidden_size = 128
shared_experts = 1

[model.moe.router]
plugin = "aux_free"

[model.moe.experts]
plugin = "grouped"

[optimizer]
plugin = "adamw"
weight_decay = 0.1

[schedule]
plugin = "single"

[eval]
every = 5
batches = 1

[checkpoint]
every = 1
keep = 2
resume = true

[train]
steps = {steps}
batch_size = 2
seq_len = 32
lr = 3e-3
min_lr = 3e-4
warmup_steps = 3
lr_schedule = "cosine"
grad_clip = 1.0
log_every = 1
seed = 99
dtype = "float32"
device = "cpu"
"""
# metrics.jsonl fields that depend only on the computation (not on time or memory).
DETERMINISTIC = ["step", "loss", "cross_entropy", "smoothed_loss", "aux_loss", "router_losses", "lr",
                 "grad_norm", "grad_norms", "val_loss"]


class Failure(Exception):
    pass


def metrics_of(run):
    rows = {}
    path = run / "metrics.jsonl"
    for number, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        if row["step"] in rows:
            raise Failure(f"{path}:{number}: step {row['step']} logged twice")
        kept = {key: row.get(key) for key in DETERMINISTIC}
        kept["tokens_per_expert"] = [layer["tokens_per_expert"] for layer in row["router"]]
        rows[row["step"]] = kept
    return rows


def checkpoint_steps(run):
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:14]) for p in folder.glob("step_*.safetensors"))


def unfinished(run):
    return sorted(str(p.relative_to(run)) for p in list(run.glob("*.tmp")) + list(run.glob("checkpoints/*.tmp")))


def lines_of(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# Triggers: each waits for its moment while the run goes on, then returns a description.
def after_seconds(seconds):
    def wait(process, run):
        time.sleep(seconds)
        return f"{seconds} s after the start"
    return wait


def after_logged(step, delay):
    def wait(process, run):
        while lines_of(run / "metrics.jsonl") < step:
            if process.poll() is not None:
                raise Failure(f"the run ended before it logged step {step}")
            time.sleep(0.001)
        time.sleep(delay)
        return f"{delay * 1000:.0f} ms after step {step} was logged"
    return wait


def after_saved(step, delay):
    """DELAY seconds after checkpoint STEP is in place: in the next step's computation."""
    def wait(process, run):
        while not (run / checkpoint(step)).exists():
            if process.poll() is not None:
                raise Failure(f"the run ended without saving {checkpoint(step)}")
            time.sleep(0.0005)
        time.sleep(delay)
        return f"{delay * 1000:.0f} ms after {checkpoint(step)} was saved"
    return wait


def inside_write(name):
    """The moment NAME.tmp appears: the save of NAME is under way."""
    def wait(process, run):
        target = run / name
        while not os.path.exists(f"{target}.tmp"):
            if process.poll() is not None:
                raise Failure(f"the run ended without writing {name}.tmp")
            time.sleep(0.0005)
        return f"while {name} was being written"
    return wait


def checkpoint(step):
    return f"checkpoints/step_{step:09d}.safetensors"


def main():
    binary, fortunes = Path(sys.argv[1]).resolve(), sys.argv[2]
    # One compute thread: on a busy 2-core machine idle OpenMP threads spin and a run takes twice as
    # long; every run (reference, killed, rerun) gets the same setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="pithtrain_crash_safety_"))
    started = time.monotonic()
    try:
        data = work / "fortunes.tokens"
        subprocess.run([binary, "data", "build", "--format", "fortune", "--out", data, fortunes], check=True,
                       stdout=subprocess.DEVNULL)
        config = work / "crash_safety.toml"
        config.write_text(CONFIG.format(data=data, steps=STEPS))

        def command(run):
            return [str(binary), "--config", str(config), "--out", str(run)]

        reference = work / "reference"
        result = subprocess.run(command(reference), capture_output=True, text=True)
        if result.returncode != 0:
            raise Failure(f"the reference run failed:\n{result.stdout}{result.stderr}")
        expected = metrics_of(reference)
        if sorted(expected) != list(range(1, STEPS + 1)):
            raise Failure(f"the reference run logged steps {sorted(expected)}, not 1..{STEPS}")
        size = (reference / checkpoint(STEPS)).stat().st_size
        print(f"reference: {STEPS} steps in {time.monotonic() - started:.1f} s, checkpoints of {size / 1e6:.1f} MB")

        # Each scenario: the kills in turn (the rerun after one kill is the next one's victim), then
        # a plain rerun to the end.
        scenarios = {
            "during_startup": [after_seconds(0.3)],
            "mid_step_3": [after_saved(2, 0.0)],
            "writing_step_3": [inside_write(checkpoint(3))],
            "between_logging_and_saving_step_5": [after_logged(5, 0.0)],
            "writing_step_6_then_step_8": [inside_write(checkpoint(6)), inside_write(checkpoint(8))],
            "mid_step_10": [after_saved(9, 0.01)],
            "writing_step_11": [inside_write(checkpoint(11))],
            "writing_the_last_step": [inside_write(checkpoint(STEPS))],
            "writing_model_safetensors": [inside_write("model.safetensors")],
        }
        inside_a_checkpoint_write = 0
        for name, kills in scenarios.items():
            run = work / name
            for kill_number, trigger in enumerate(kills):
                log = run.parent / f"{name}_{kill_number}.log"
                run.mkdir(exist_ok=True)
                before = checkpoint_steps(run)
                with open(log, "w") as out:
                    process = subprocess.Popen(command(run), stdout=out, stderr=subprocess.STDOUT)
                    when = trigger(process, run)
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                if process.returncode != -signal.SIGKILL:
                    raise Failure(f"{name}: the run was not killed {when} (exit {process.returncode}); see {log}")
                if kill_number > 0:  # this run was itself a rerun: it resumed as it should
                    expect_resumed(log.read_text(), run, before, f"{name} (kill {kill_number + 1})")
                left = unfinished(run)
                inside_a_checkpoint_write += any(path.startswith("checkpoints/") for path in left)
                print(f"{name}: killed {when}; complete checkpoints {checkpoint_steps(run)}, unfinished {left}")
            complete = checkpoint_steps(run)
            result = subprocess.run(command(run), capture_output=True, text=True)
            if result.returncode != 0:
                raise Failure(f"{name}: the rerun failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
            expect_resumed(result.stdout + result.stderr, run, complete, name)
            if unfinished(run):
                raise Failure(f"{name}: the rerun left {unfinished(run)}")
            compare(expected, metrics_of(run), name)
            for file in ["model.safetensors", checkpoint(STEPS)]:
                if without_run_identity((run / file).read_bytes()) != without_run_identity((reference / file).read_bytes()):
                    raise Failure(f"{name}: {file} differs from the uninterrupted run's")
        if inside_a_checkpoint_write < 2:
            raise Failure(f"only {inside_a_checkpoint_write} kill(s) landed inside a checkpoint write (a .tmp was "
                          "left behind); at least 2 were expected")
        read_with_python_safetensors(work / "writing_step_11" / checkpoint(STEPS))
        print(f"ok: {len(scenarios)} scenarios, {sum(len(k) for k in scenarios.values())} kills "
              f"({inside_a_checkpoint_write} runs left an unfinished checkpoint), every rerun resumed from the newest "
              f"complete checkpoint and matched the uninterrupted run bit for bit; {time.monotonic() - started:.1f} s")
        return 0
    except Failure as failure:
        print(f"FAIL {failure}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def expect_resumed(output, run, complete, name):
    if complete:
        path = run / checkpoint(complete[-1])
        if f"resumed from {path} at step {complete[-1]}" not in output:
            raise Failure(f"{name}: the rerun did not resume from {path}, the newest complete checkpoint:\n{output}")
    elif "resumed from" in output:
        raise Failure(f"{name}: the rerun resumed although no checkpoint was complete:\n{output}")


def without_run_identity(content):
    """A safetensors file's bytes with what names the run and what covers it blanked: every run directory
    has its own run id (checkpoint metadata "run_id"), and the whole-file checksum covers it. The tensors
    and every other metadata field stay, byte for byte."""
    (length,) = struct.unpack_from("<Q", content)
    header = json.loads(content[8:8 + length])
    metadata = header.get("__metadata__", {})
    for key in ("run_id", "file_checksum"):
        metadata.pop(key, None)
    return json.dumps(header, sort_keys=True).encode() + content[8 + length:]


def compare(expected, got, name):
    if sorted(got) != sorted(expected):
        raise Failure(f"{name}: metrics.jsonl has steps {sorted(got)}, the uninterrupted run {sorted(expected)}")
    for step in sorted(expected):
        if got[step] != expected[step]:
            differing = {key: (got[step][key], expected[step][key]) for key in got[step] if got[step][key] != expected[step][key]}
            raise Failure(f"{name}: step {step} differs from the uninterrupted run (got, expected): {differing}")


def read_with_python_safetensors(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as file:
        metadata = file.metadata()
        names = list(file.keys())
        weight = file.get_tensor("model/embedding.weight")
    if metadata.get("step") != str(STEPS) or metadata.get("checksum_scheme") != "fnv1a64-whole-file":
        raise Failure(f"{path}: unexpected metadata {metadata}")
    if "rng/cpu" not in names or weight.shape != (257, 128):
        raise Failure(f"{path}: unexpected tensors {names[:5]}..., embedding {weight.shape}")


if __name__ == "__main__":
    sys.exit(main())
