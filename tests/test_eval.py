#!/usr/bin/env python3
"""ctest `eval_command`: `pithtrain eval` after a tiny run with validation. On the run's own validation
windows it prints the run's last validation loss (metrics.jsonl's val_loss, 6 significant digits, and a
checkpoint's weights give that step's); over a whole token file its loss, perplexity and bits per byte
agree with each other and with the file; bad input (no run, no weights, a token file that is not one or
of another tokenizer) exits non-zero with one line naming the file.

Args: PITHTRAIN_BIN SOURCE_DIR FORTUNES_DIR. The config is tests/configs/tiny.toml, shrunk with --set."""
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

binary, source, fortunes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def pithtrain(*args, expect_ok=True):
    result = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if expect_ok and result.returncode != 0:
        sys.exit(f"FAIL: pithtrain {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def evaluate(*args):
    return json.loads(pithtrain("eval", "--json", *args).stdout)


with tempfile.TemporaryDirectory() as scratch:
    work = Path(scratch)
    tokens = work / "tokens"
    pithtrain("data", "build", "--format", "fortune", "--out", tokens, fortunes / "literature")
    run_dir = work / "run"
    pithtrain("--config", source / "tests/configs/tiny.toml", "--set", f"data.path={tokens}", "--set", "model.num_layers=2",
              "--set", "train.batch_size=2", "--set", "train.seq_len=32", "--set", "train.warmup_steps=1",
              "--set", "train.steps=6", "--set", "train.log_every=1", "--set", "eval.every=3", "--set", "eval.batches=3",
              "--set", "checkpoint.every=3", "--out", run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = {record["step"]: record["val_loss"] for record in records if "val_loss" in record}
    check(sorted(validation) == [3, 6], f"validation at steps {sorted(validation)}, not 3 and 6")

    # The run's own validation windows (the default without --data): the run's last validation loss.
    report = evaluate("--run", run_dir)
    print("validation split:", report)
    check(report["split"] == "validation" and report["step"] == 6 and report["weights"].endswith("model.safetensors"),
          f"not the run's final weights on its validation split: {report}")
    check(float(f"{report['loss']:.6g}") == validation[6] and abs(report["loss"] - validation[6]) <= 5e-6 * validation[6],
          f"eval says {report['loss']!r}, the run's last validation loss was {validation[6]!r}")
    check(report["windows"] == 3 * 2 and report["targets"] == 6 * 32, f"not 3 batches of 2 windows of 32 targets: {report}")
    check(math.isclose(report["perplexity"], math.exp(report["loss"]), rel_tol=1e-12), "perplexity is not e^loss")
    # The same printed for people, to metrics.jsonl's 6 digits.
    human = pithtrain("eval", "--run", run_dir).stdout
    check(f"loss {validation[6]:.6g} |" in human and "the run's validation windows" in human, f"the human report differs:\n{human}")
    # A checkpoint's weights give that step's validation loss.
    report3 = evaluate("--run", run_dir, "--weights", run_dir / "checkpoints/step_000000003.safetensors")
    check(float(f"{report3['loss']:.6g}") == validation[3] and report3["step"] == 3,
          f"step 3's checkpoint gives {report3['loss']!r}, the run said {validation[3]!r}")
    # Without model.safetensors the newest checkpoint is used.
    (run_dir / "model.safetensors").rename(work / "model.safetensors")
    newest = evaluate("--run", run_dir)
    check(newest["weights"].endswith("step_000000006.safetensors") and newest["loss"] == report["loss"],
          f"the newest checkpoint is not the fallback, or differs from model.safetensors: {newest}")
    (work / "model.safetensors").rename(run_dir / "model.safetensors")

    # Every window of a whole (small) file: bits per byte from the loss and the file's bytes.
    tokens = work / "small.tokens"
    pithtrain("data", "build", "--format", "fortune", "--out", tokens, fortunes / "ascii-art")
    data = tokens.read_bytes()
    count = struct.unpack("<Q", data[24:32])[0]
    stream = struct.unpack(f"<{count}H", data[64:])
    whole = evaluate("--run", run_dir, "--data", tokens)
    windows = (count - 1) // 32
    targets = [token for window in range(windows) for token in stream[window * 32 + 1:window * 32 + 33]]
    byte_count = sum(token < 256 for token in targets)
    print("whole file:", whole)
    check(whole["split"] == "all" and whole["windows"] == windows and whole["targets"] == len(targets) and whole["bytes"] == byte_count,
          f"whole file: {whole} but the file has {windows} windows, {len(targets)} targets, {byte_count} bytes among them")
    check(math.isclose(whole["bits_per_byte"], whole["loss"] * len(targets) / (math.log(2) * byte_count), rel_tol=1e-12),
          "bits per byte is not the targets' loss in bits over their bytes")
    check(0 < whole["bits_per_byte"] < 8.1 and abs(whole["loss"] - report["loss"]) < 1.0, f"implausible whole-file figures: {whole}")

    # Bad input: one line on stderr naming the file, non-zero exit.
    not_tokens = work / "notes.txt"
    not_tokens.write_text("just text\n" * 100)
    wide = work / "wide.tokens"  # a valid token file of a 70000-token vocabulary
    body = struct.pack("<100I", *range(100))
    wide.write_bytes(struct.pack("<8sIIIIQQQ16x", b"PTTOKENS", 1, 4, 70000, 3, 100, 1, zlib.crc32(body)) + body)
    no_weights = work / "no_weights"
    no_weights.mkdir()
    shutil.copy(run_dir / "config.toml", no_weights / "config.toml")
    cases = [
        (["--run", work / "missing"], [str(work / "missing"), "does not exist"]),
        (["--run", work], [str(work), "no config.toml"]),
        (["--run", no_weights], [str(no_weights), "no weights", "--weights"]),
        (["--run", run_dir, "--weights", work / "nope.safetensors"], [str(work / "nope.safetensors"), "no such file"]),
        (["--run", run_dir, "--data", not_tokens], [str(not_tokens), "not a PithTrain token file", "data build"]),
        (["--run", run_dir, "--data", wide], [str(wide), "70000", "another tokenizer"]),
        (["--run", run_dir, "--split", "test"], ["--split", "'test'"]),
    ]
    for args, words in cases:
        result = pithtrain("eval", *args, expect_ok=False)
        lines = result.stderr.strip().splitlines()
        check(result.returncode != 0 and lines and lines[-1].startswith("pithtrain: error:") and all(w in lines[-1] for w in words),
              f"eval {' '.join(map(str, args))}: expected an error naming {words}, got {result.returncode}: {result.stderr.strip()}")

print(f"{0 if failures else 1} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
