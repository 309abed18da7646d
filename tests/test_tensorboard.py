#!/usr/bin/env python3
"""ctest `tensorboard`: the event files a run writes in RUN_DIR/tensorboard/ hold every scalar of
metrics.jsonl, read back with TensorBoard's own reader (the `tensorboard` package from PyPI, in the venv),
and still do after a resume that drops steps: one event file, each step once, the resumed run's values.

Args: PITHTRAIN_BIN SOURCE_DIR FORTUNES_DIR (run by the venv's python). The config is tests/configs/tiny.toml,
shrunk with --set."""
import json
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator, event_file_loader

binary, source, fortunes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def run(*args):
    result = subprocess.run([binary, *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL: pithtrain {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def scalars_of(record):
    """The documented tags of one metrics.jsonl record (docs/training.md, "TensorBoard")."""
    tags = {}

    def walk(value, path):
        if isinstance(value, bool) or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            tags[path] = float(value)
        elif isinstance(value, dict):
            for key, member in value.items():
                if key != "moe_layer":
                    walk(member, f"{path}/{key}")
        elif isinstance(value, list) and not all(isinstance(item, (int, float)) for item in value):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}")

    for key, value in record.items():
        if key != "step":
            walk(value, key)
    return tags


def as_float32(number):
    return struct.unpack("<f", struct.pack("<f", number))[0]


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def check_framing(path):
    """Every record's length and data CRC-32C, checked here too (not only by TensorBoard's reader)."""
    data, position, records = path.read_bytes(), 0, 0
    while position < len(data):
        header = data[position:position + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[position + 8:position + 12])
        body = data[position + 12:position + 12 + length]
        (body_crc,) = struct.unpack("<I", data[position + 12 + length:position + 16 + length])
        check(masked(header) == header_crc and masked(body) == body_crc and len(body) == length,
              f"{path.name}: record {records} has a bad length or CRC")
        position += 16 + length
        records += 1
    check(position == len(data), f"{path.name}: trailing bytes after the last record")
    return records


def compare(run_dir, label):
    """The event folder against metrics.jsonl: returns {step: wall_time}."""
    folder = run_dir / "tensorboard"
    files = sorted(folder.iterdir())
    event_files = [f for f in files if "tfevents" in f.name]
    check(len(event_files) == 1 and len(files) == 1, f"{label}: the folder holds {[f.name for f in files]}, not one event file")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {record["step"]: scalars_of(record) for record in records}
    check(any("/" in tag for tag in expected[records[-1]["step"]]), f"{label}: no nested tag (router, grad_norms) to compare")

    # Raw events, in file order: the file version first, then each logged step exactly once.
    raw = list(event_file_loader.EventFileLoader(str(event_files[0])).Load())
    check(check_framing(event_files[0]) == len(raw), f"{label}: TensorBoard's reader stopped before the file's end")
    check(raw[0].file_version == "brain.Event:2", f"{label}: the first event is not the file version")
    steps = [event.step for event in raw[1:]]
    check(steps == [record["step"] for record in records], f"{label}: event steps {steps} are not metrics.jsonl's")
    wall_times = {event.step: event.wall_time for event in raw[1:]}

    # TensorBoard's accumulator (what its scalar dashboard shows), every tag and every step.
    accumulator = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    all_tags = set().union(*(tags.keys() for tags in expected.values()))
    check(set(accumulator.Tags()["scalars"]) == all_tags,
          f"{label}: tags differ: only in TensorBoard {set(accumulator.Tags()['scalars']) - all_tags}, "
          f"only in metrics.jsonl {all_tags - set(accumulator.Tags()['scalars'])}")
    compared = 0
    for tag in sorted(all_tags):
        shown = {event.step: event.value for event in accumulator.Scalars(tag)} if tag in accumulator.Tags()["scalars"] else {}
        wanted = {step: as_float32(tags[tag]) for step, tags in expected.items() if tag in tags}
        check(len(accumulator.Scalars(tag) if shown else []) == len(wanted), f"{label}: tag {tag} has a duplicated step")
        check(shown == wanted, f"{label}: tag {tag}: TensorBoard {shown} != metrics.jsonl {wanted}")
        compared += len(wanted)
    print(f"{label}: {len(records)} steps, {len(all_tags)} tags, {compared} scalars equal to metrics.jsonl")
    return wall_times, {step: tags["lr"] for step, tags in expected.items()}


with tempfile.TemporaryDirectory() as scratch:
    work = Path(scratch)
    run("data", "build", "--format", "fortune", "--out", str(work / "tokens"), str(fortunes / "literature"))
    common = ["--config", str(source / "tests/configs/tiny.toml"), "--set", f"data.path={work / 'tokens'}",
              "--set", "model.num_layers=2", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
              "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set", "eval.every=2",
              "--set", "eval.batches=1", "--set", "checkpoint.every=3"]
    run_dir = work / "run"
    run(*common, "--set", "train.steps=6", "--out", str(run_dir))
    first_times, first_lr = compare(run_dir, "first run")
    check(all("val_loss" in json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[1::2]),
          "the validation loss is not in the even steps' metrics")

    # Resume from step 3: the final checkpoint (step 6) goes, and more steps change the cosine schedule,
    # so steps 4-6 are written anew with other learning rates; stale ones would show.
    (run_dir / "checkpoints" / "step_000000006.safetensors").unlink()
    resumed = run(*common, "--set", "train.steps=8", "--out", str(run_dir))
    check("resumed from" in resumed.stdout + resumed.stderr and "at step 3" in resumed.stdout + resumed.stderr,
          "the second run did not resume from step 3")
    second_times, second_lr = compare(run_dir, "after resume")
    check(sorted(second_times) == list(range(1, 9)), f"after resume: steps {sorted(second_times)}, not 1..8")
    check(all(second_times[step] == first_times[step] for step in (1, 2, 3)), "the kept steps lost their wall times")
    check(all(second_lr[step] != first_lr[step] for step in (4, 5, 6)), "the resumed steps' lr did not change: the test shows nothing")

    # metrics.tensorboard = false: no folder.
    off = work / "off"
    run(*common, "--set", "train.steps=2", "--set", "metrics.tensorboard=false", "--out", str(off))
    check((off / "metrics.jsonl").exists() and not (off / "tensorboard").exists(), "metrics.tensorboard = false still wrote a folder")

print(f"{0 if failures else 1} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
