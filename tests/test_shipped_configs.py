#!/usr/bin/env python3
"""ctest `shipped_configs`: every configs/*.toml loads (every key valid, every plugin found) and trains two
steps. The one test that reads the shipped configs: all others own theirs (tests/configs/), so editing a
value in configs/ breaks nothing else, and a config that no longer loads breaks this.

The full-size architectures (Qwen3-30B, DeepSeek-V3, ...) do not fit a 2-core CPU test, and some name
`train.device = "cuda"`: each config is trained with its own plugins and features (attention variant,
router groups, shared experts, biases, YaRN, windows, dtype) but its sizes overridden with --set down to a
few thousand parameters per layer, on byte-level text, on the CPU. The overrides keep each config's
structure valid (heads divisible by key/value heads, experts divisible by router groups, top_k reachable
within the groups a token may use). Args: PITHTRAIN_BIN SOURCE_DIR FORTUNES_DIR"""
import json
import math
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

binary, source, fortunes = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
KIND_KEYS = ("model.attention.plugin", "model.moe.router.plugin", "model.moe.experts.plugin", "optimizer.plugin",
             "schedule.plugin")


def lookup(table, dotted, default=None):
    for part in dotted.split("."):
        if not isinstance(table, dict) or part not in table:
            return default
        table = table[part]
    return table


def shrink(config):
    """--set overrides that bring `config` to CPU test size without changing what it is made of."""
    model = config.get("model", {})
    attention, moe = model.get("attention", {}), model.get("moe", {})
    router = moe.get("router", {})
    sets = {"model.vocab_size": 257,  # the byte-level test data: 256 bytes + end of document
            "model.hidden_size": 32, "model.num_heads": 4, "model.moe.expert_hidden_size": 32,
            "train.device": '"cpu"', "train.seq_len": 32, "train.batch_size": 2, "train.steps": 2, "train.log_every": 1,
            "eval.every": 0, "eval.batches": 1, "checkpoint.every": 0}
    heads = model.get("num_heads", 1)
    if "num_kv_heads" in model:  # keep MHA as MHA, MQA as MQA, GQA as GQA
        kv = model["num_kv_heads"]
        sets["model.num_kv_heads"] = 4 if kv == heads else 1 if kv == 1 else 2
    if "head_dim" in model:
        sets["model.head_dim"] = 8
    first_dense = min(model.get("first_dense_layers", 0), 1)
    if "first_dense_layers" in model:
        sets["model.first_dense_layers"] = first_dense
    sets["model.num_layers"] = min(model.get("num_layers", 2), first_dense + 2)  # two layers: even and odd
    if "dense_hidden_size" in model:
        sets["model.dense_hidden_size"] = 64
    # Experts: a multiple of the router's groups, about 8 (at least 2 per group when grouped, as aux_free
    # needs); top_k within the topk_groups groups a token may pick from.
    groups = router.get("num_groups", 1)
    per_group = max(1 if groups == 1 else 2, math.ceil(min(moe.get("num_experts", 8), 8) / groups))
    experts = groups * per_group
    sets["model.moe.num_experts"] = experts
    sets["model.moe.top_k"] = max(1, min(moe.get("top_k", 2), router.get("topk_groups", groups) * per_group, experts))
    for key, small in (("q_lora_rank", 16), ("kv_lora_rank", 16), ("qk_nope_head_dim", 8), ("qk_rope_head_dim", 8),
                       ("v_head_dim", 8)):
        if key in attention and not (key == "q_lora_rank" and attention[key] == 0):
            sets[f"model.attention.{key}"] = small
    # Hybrids (Qwen3-Next, Qwen3.5): of the two layers, one linear_attention then one full_attention, and the
    # linear attention's heads shrunk with the same key/value ratio kind (more value heads than key heads).
    if "full_attention_interval" in model:
        sets["model.full_attention_interval"] = 2
    if "layer_types" in model:
        sets["model.layer_types"] = '["linear_attention", "full_attention"]'
    linear = model.get("linear_attention", {})
    for key, small in (("num_key_heads", 2), ("num_value_heads", 4), ("key_head_dim", 8), ("value_head_dim", 8)):
        if key in linear:
            sets[f"model.linear_attention.{key}"] = small
    if attention.get("sliding_window", 0) > 0:
        sets["model.attention.sliding_window"] = 16  # still shorter than the 32-token sequences
    train = config.get("train", {})
    if "micro_batches" in train:
        sets["train.micro_batches"] = 1
    if "global_batch_size" in train:
        sets["train.global_batch_size"] = 2  # one process, one micro-batch of 2
    if "warmup_steps" in train:
        sets["train.warmup_steps"] = 1
    for key in ("pipeline", "data", "context", "expert"):  # one process
        if key in config.get("parallel", {}):
            sets[f"parallel.{key}"] = 1
    return sets


work = Path(tempfile.mkdtemp(prefix="pithtrain_shipped_configs_"))
tokens = work / "tokens"
subprocess.run([binary, "data", "build", "--format", "fortune", "--out", str(tokens), f"{fortunes}/literature"],
               check=True, capture_output=True)
configs = sorted((source / "configs").glob("*.toml"))
failures = []
for path in configs:
    with open(path, "rb") as file:
        config = tomllib.load(file)
    sets = shrink(config)
    sets["data.path"] = json.dumps(str(tokens))
    run_dir = work / path.stem
    command = [binary, "--config", str(path), "--out", str(run_dir)]
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    result = subprocess.run(command, capture_output=True, text=True)
    problem = None
    if result.returncode != 0:
        problem = f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
    else:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        with open(run_dir / "config.toml", "rb") as file:
            resolved = tomllib.load(file)
        if [row["step"] for row in rows] != [1, 2] or not all(math.isfinite(row["loss"]) for row in rows):
            problem = f"expected 2 steps of finite loss, got {[(row['step'], row['loss']) for row in rows]}"
        for key in KIND_KEYS:  # the run used the plugins the file names
            if lookup(config, key) is not None and lookup(resolved, key) != lookup(config, key):
                problem = f"{key} is {lookup(config, key)!r} in the file but the run used {lookup(resolved, key)!r}"
    print(f"{'ok  ' if problem is None else 'FAIL'} {path.relative_to(source)}" + (f": {problem}" if problem else ""))
    if problem:
        failures.append(path.name)
print(f"{len(configs) - len(failures)} passed, {len(failures)} failed")
subprocess.run(["rm", "-rf", str(work)])
sys.exit(1 if failures or not configs else 0)
