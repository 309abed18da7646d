#!/usr/bin/env python3
"""ctest `bad_input`: every kind of bad input (config files, --set, the command line, plugin files, token
files, checkpoints, Hugging Face folders, run directories) gets a non-zero exit, one clean error line that
names what was wrong and where, no crash text, and leaves every file that existed before byte-identical.

Args: --bin PITHTRAIN --broken-plugins DIR [--jobs N] [-k SUBSTRING]. A case marked `pending` waits for a
fix in another branch: it runs, and while PITHTRAIN_BAD_INPUT_STRICT is unset a failure is reported as
XFAIL (and a pass as XPASS) instead of failing the suite. Adding a case is one entry in CASES."""
import argparse
import concurrent.futures
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# Text that only an uncaught exception, an abort or a crash prints.
CRASH_TEXT = re.compile(r"terminate called|Exception raised from|what\(\):|Segmentation fault|Aborted|core dumped|"
                        r"AddressSanitizer|stack trace|^\s*frame #\d+", re.M)


# ---------------------------------------------------------------------------------------------------
# Inputs the cases write: a tiny config (edited per case), token files, safetensors, a Hugging Face folder.

BASE_CONFIG = [  # (table, [(key, TOML value)]); "" is the top level
    ("run", [("name", '"case"')]),
    ("data", [("path", '"data.tokens"'), ("validation_fraction", "0.1")]),
    ("model", [("vocab_size", "257"), ("hidden_size", "16"), ("num_layers", "1"), ("num_heads", "2")]),
    ("model.attention", [("plugin", '"gqa"')]),
    ("model.moe", [("num_experts", "2"), ("top_k", "1"), ("expert_hidden_size", "16")]),
    ("model.moe.router", [("plugin", '"topk_softmax"')]),
    ("model.moe.experts", [("plugin", '"grouped"')]),
    ("optimizer", [("plugin", '"adamw"')]),
    ("schedule", [("plugin", '"single"')]),
    ("eval", [("batches", "1")]),
    ("train", [("steps", "2"), ("batch_size", "2"), ("seq_len", "16"), ("warmup_steps", "0"), ("log_every", "1")]),
]


def cfg(changes=None, drop=()):
    """The base config with `changes` ({"train.lr": "-1"}: dotted key -> TOML value text, added or replaced
    in place) and `drop` (dotted keys or whole tables) applied."""
    tables = [(name, list(entries)) for name, entries in BASE_CONFIG if name not in drop]
    for name, entries in tables:
        entries[:] = [(key, value) for key, value in entries if f"{name}.{key}" not in drop]
    names = [name for name, _ in tables]
    for dotted, value in (changes or {}).items():
        table = max((name for name in names if dotted.startswith(name + ".")), key=len, default=None)
        if table is None:
            table = dotted.rpartition(".")[0]
            tables.insert(0, (table, [])) if table == "" else tables.append((table, []))
            names = [name for name, _ in tables]
        key = dotted[len(table) + 1:] if table else dotted
        entries = tables[names.index(table)][1]
        for index, (existing, _) in enumerate(entries):
            if existing == key:
                entries[index] = (key, value)
                break
        else:
            entries.append((key, value))
    lines = []
    for name, entries in tables:
        if name:
            lines += ["", f"[{name}]"]
        lines += [f"{key} = {value}" for key, value in entries]
    return "\n".join(lines).lstrip("\n") + "\n"


def line_of(toml_text, dotted):
    """The 1-based line where `dotted` is written in TOML text made by cfg()."""
    table = ""
    for number, line in enumerate(toml_text.splitlines(), 1):
        if line.startswith("["):
            table = line.strip("[]")
            continue
        key = line.split("=")[0].strip()
        if key and (f"{table}.{key}" if table else key) == dotted:
            return number
    raise KeyError(f"{dotted} is not in the config")


def token_file(ids=None, vocab=257, magic=b"PTTOKENS", version=1, width=2, num_tokens=None, checksum=None):
    """A token file (docs/data.md): 64-byte header, then little-endian ids; any field can be made wrong."""
    if ids is None:
        generator = random.Random(7)
        ids = [generator.randrange(256) if i % 200 else 256 for i in range(1, 3001)]
    body = b"".join(struct.pack("<H" if width == 2 else "<I", i) for i in ids) if width in (2, 4) else bytes(len(ids) * width)
    header = struct.pack("<8sIIIIQQQ16s", magic, version, width, vocab, 1, len(ids) if num_tokens is None else num_tokens,
                         ids.count(256), zlib.crc32(body) if checksum is None else checksum, bytes(16))
    return header + body


TOKENS = token_file()


def safetensors(tensors, metadata=None):
    """A safetensors file of float32 tensors: {name: shape} (values 0, 1, 2, ...) or {name: (dtype, shape)}."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, spec in tensors.items():
        dtype, shape = spec if isinstance(spec[0], str) else ("F32", spec)
        count = 1
        for size in shape:
            count *= size
        raw = struct.pack(f"<{count}f", *range(count)) if dtype == "F32" else bytes(count)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# A tiny Qwen3-MoE in Hugging Face form: config.json and the tensors (name -> shape) it implies.
HF_CONFIG = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "num_experts": 2,
             "num_experts_per_tok": 1, "moe_intermediate_size": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
             "tie_word_embeddings": False, "norm_topk_prob": True}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def hf_tensors():
    v, h, heads, kv, d, e, f = 32, 16, 2, 1, 8, 2, 8
    layer = "model.layers.0."
    tensors = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
               layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
               Q_PROJ: (heads * d, h), layer + "self_attn.k_proj.weight": (kv * d, h),
               layer + "self_attn.v_proj.weight": (kv * d, h), layer + "self_attn.o_proj.weight": (h, heads * d),
               layer + "self_attn.q_norm.weight": (d,), layer + "self_attn.k_norm.weight": (d,),
               layer + "mlp.gate.weight": (e, h)}
    for expert in range(e):
        base = f"{layer}mlp.experts.{expert}."
        tensors.update({base + "gate_proj.weight": (f, h), base + "up_proj.weight": (f, h), base + "down_proj.weight": (h, f)})
    return tensors


def hf_folder(config_changes=None, drop_keys=(), tensor_changes=None, drop_tensors=(), weights=True):
    """Files of a Hugging Face folder `hf/`, the good one unless changed."""
    config = {k: v for k, v in {**HF_CONFIG, **(config_changes or {})}.items() if k not in drop_keys}
    files = {"hf/config.json": json.dumps(config, indent=2)}
    if weights:
        tensors = {k: v for k, v in {**hf_tensors(), **(tensor_changes or {})}.items() if k not in drop_tensors}
        files["hf/model.safetensors"] = safetensors(tensors)
    return files


def hf_sharded_folder(shard_changes=None, move_in_index=None):
    """Files of a good Hugging Face folder `hf/` with its tensors in two shards and model.safetensors.index.json;
    shard_changes: {1 or 2: bytes -> bytes} spoils a shard; move_in_index: {tensor: shard} misleads the index."""
    tensors = list(hf_tensors().items())
    parts = {1: dict(tensors[:len(tensors) // 2]), 2: dict(tensors[len(tensors) // 2:])}
    files, weight_map = {"hf/config.json": json.dumps(HF_CONFIG, indent=2)}, {}
    for number, part in parts.items():
        name = f"model-{number:05d}-of-00002.safetensors"
        files["hf/" + name] = (shard_changes or {}).get(number, lambda data: data)(safetensors(part))
        weight_map.update({tensor: name for tensor in part})
    for tensor, number in (move_in_index or {}).items():
        weight_map[tensor] = f"model-{number:05d}-of-00002.safetensors"
    files["hf/model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map})
    return files


def flip_bit(data, offset, bit=0):
    data = bytearray(data)
    data[offset] ^= 1 << bit
    return bytes(data)


def data_offset(safetensors_bytes, fraction=0.5):
    """An offset inside the data section of a safetensors file."""
    header_size = struct.unpack("<Q", safetensors_bytes[:8])[0]
    start = 8 + header_size
    return start + int((len(safetensors_bytes) - start) * fraction)


def metadata_digit_offset(safetensors_bytes, key):
    """The offset of the first digit of metadata value `key` (flipping bit 0 of a digit leaves a digit)."""
    header_size = struct.unpack("<Q", safetensors_bytes[:8])[0]
    header = safetensors_bytes[8:8 + header_size]
    start = header.index(f'"{key}":"'.encode()) + len(key) + 4
    while not chr(header[start]).isdigit():
        start += 1
    return 8 + start


# ---------------------------------------------------------------------------------------------------
# Fixtures made once per suite run by the real binary: a trained run directory (a checkpoint, the final
# model.safetensors), reused read-only by the cases that need real checkpoints.

class Fixtures:
    def __init__(self, binary, root):
        self.binary, self.root, self._run = binary, Path(root), None

    def run_dir(self):
        if self._run is None:
            work = self.root / "fixture"
            work.mkdir()
            (work / "c.toml").write_text(cfg())
            (work / "data.tokens").write_bytes(TOKENS)
            result = subprocess.run([self.binary, "--config", "c.toml", "--out", "run"], cwd=work, capture_output=True,
                                    text=True, env=case_environment({}), timeout=300)
            checkpoints = sorted((work / "run" / "checkpoints").glob("step_*.safetensors"))
            if result.returncode != 0 or len(checkpoints) != 1 or not (work / "run" / "model.safetensors").exists():
                sys.exit(f"fixture: the good config does not train (exit {result.returncode}):\n{result.stderr[-3000:]}")
            self._run = work / "run"
        return self._run

    def weights(self):
        return (self.run_dir() / "model.safetensors").read_bytes()


@dataclass
class RunCopy:
    """A case file that is a copy of the fixture run directory, with `edit(run_path, fixtures)` applied."""
    edit: object = None


@dataclass
class Copy:
    """A case file copied from the broken-plugin build folder (or a fixture): `source(args, fixtures) -> Path`."""
    source: object
    truncate_to: float = 1.0


def checkpoint_edit(transform):
    """A RunCopy edit that rewrites the run's (only) checkpoint with transform(bytes)."""
    def edit(run, fixtures):
        path = next((run / "checkpoints").glob("step_*.safetensors"))
        path.write_bytes(transform(path.read_bytes()))
    return edit


# ---------------------------------------------------------------------------------------------------
# The cases. command: arguments after the binary; files: relative path -> str | bytes | callable(fixtures)
# -> str | bytes | RunCopy | Copy; expect: a regex searched in the error line, where {L:dotted.key} is
# "c.toml:LINE" of that key in the case's c.toml; env: extra environment; pending: why it may fail today.

@dataclass
class Case:
    name: str
    command: list
    files: dict
    expect: str
    pending: str = ""
    env: dict = field(default_factory=dict)
    needs: tuple = ()  # programs the case needs on PATH (skipped without them)


def train(changes=None, drop=(), args=(), files=None):
    """A training command on c.toml (the base config with changes) and a good token file."""
    return {"command": ["--config", "c.toml", *args],
            "files": {"c.toml": cfg(changes, drop), "data.tokens": TOKENS, **(files or {})}}


def crc_flipped(gzip_data):
    """A gzip file whose CRC-32 trailer no longer matches its data: damage gzip always detects."""
    return gzip_data[:-8] + bytes([gzip_data[-8] ^ 1]) + gzip_data[-7:]


def broken(name):
    return Copy(lambda options, fixtures: Path(options.broken_plugins) / name)


def ck(transform=lambda data: data):
    """The fixture's final model.safetensors, transformed, as a case file."""
    return lambda fixtures: transform(fixtures.weights())


IMPORT = ["convert", "import", "hf", "--out", "out"]
EXPORT = ["convert", "export", "--config", "c.toml", "--weights", "ck.safetensors", "--out", "hf_out"]
INIT = ["--init-from", "ck.safetensors"]

CASES = [
    # --- config files ---
    Case("config_missing_file", ["--config", "nope.toml"], {}, r"cannot read config file 'nope\.toml'"),
    Case("config_syntax_error", **train({"train.steps": "= 2"}), expect=r"{L:train.steps}:\d+: TOML syntax error"),
    Case("config_unknown_key", **train({"train.stpes": "3"}),
         expect=r"{L:train.stpes}: unknown key 'train\.stpes'.*did you mean 'train\.steps'"),
    Case("config_unknown_plugin_key", **train({"model.moe.router.frobnicate": "1"}),
         expect=r"{L:model.moe.router.frobnicate}: unknown key 'model\.moe\.router\.frobnicate' "
                r"\(not read by router plugin 'topk_softmax'\)"),
    Case("config_wrong_type", **train({"train.steps": '"ten"'}),
         expect=r"{L:train.steps}: 'train\.steps' must be an integer, got a string"),
    Case("config_missing_required", **train(drop=["model.hidden_size"]),
         expect=r"c\.toml: missing required key 'model\.hidden_size' \(an integer\); add it under \[model\]"),
    Case("config_misspelled_required", **train({"model.vocab_sizee": "257"}, drop=["model.vocab_size"]),
         expect=r"{L:model.vocab_sizee}: unknown key 'model\.vocab_sizee'.*did you mean 'model\.vocab_size'"),
    Case("config_table_is_a_value", **train({"eval": "3"}, drop=["eval"]), expect=r"{L:eval}: 'eval' must be a table, got an integer"),
    Case("config_steps_zero", **train({"train.steps": "0"}), expect=r"{L:train.steps}: train\.steps = 0 is out of range: it must be >= 1"),
    Case("config_device", **train({"train.device": '"tpu"'}),
         expect=r'{L:train.device}: train\.device must be "cpu" or "cuda\[:N\]", got "tpu"'),
    Case("config_dtype", **train({"train.dtype": '"float16"'}), expect=r'{L:train.dtype}: train\.dtype must be .*got "float16"'),
    Case("config_lr_schedule", **train({"train.lr_schedule": '"linear"'}),
         expect=r'{L:train.lr_schedule}: train\.lr_schedule must be .*got "linear"'),
    Case("config_validation_fraction", **train({"data.validation_fraction": "1.5"}),
         expect=r"{L:data.validation_fraction}: data\.validation_fraction = 1\.5 is out of range: it must be in \[0, 1\)"),
    Case("config_kv_heads", **train({"model.num_kv_heads": "3"}),
         expect=r"{L:model.num_kv_heads}: model\.num_kv_heads = 3 is out of range: it must be a divisor of num_heads \(2\)"),
    Case("config_head_dim_odd", **train({"model.head_dim": "7"}),
         expect=r"{L:model.head_dim}: model\.head_dim = 7 is out of range: it must be .*even"),
    Case("config_top_k", **train({"model.moe.top_k": "3"}),
         expect=r"{L:model.moe.top_k}: model\.moe\.top_k = 3 is out of range: it must be in \[1, 2\]"),
    Case("config_freeze_matches_nothing", **train({"train.freeze": '["nothing.*"]'}),
         expect=r"{L:train.freeze}: train\.freeze pattern 'nothing\.\*' matches no parameter"),
    Case("config_pipeline", **train({"parallel.pipeline": "2"}), expect=r"{L:parallel.pipeline}: parallel\.pipeline = 2 must divide"),
    Case("config_unknown_plugin", **train({"model.moe.router.plugin": '"nope"'}),
         expect=r"{L:model.moe.router.plugin}: .*unknown router plugin 'nope'.*available:"),
    Case("config_vocab_below_data", **train({"model.vocab_size": "100"}),
         expect=r"{L:model.vocab_size}: model\.vocab_size is 100 but dataset 'data\.tokens' has tokens up to 257"),
    Case("config_lr_nan", **train({"train.lr": "nan"}), expect=r"{L:train.lr}: .*train\.lr"),
    Case("config_grad_clip_inf", **train({"train.grad_clip": "inf"}), expect=r"{L:train.grad_clip}: .*train\.grad_clip"),
    Case("config_beta2_one", **train({"optimizer.beta2": "1.0"}), expect=r"{L:optimizer.beta2}: .*beta2"),
    Case("config_eps_zero", **train({"optimizer.eps": "0.0"}), expect=r"{L:optimizer.eps}: .*eps"),
    Case("config_unknown_key_and_missing_data", **train({"train.stpes": "3", "data.path": '"missing.tokens"'}),
         expect=r"{L:train.stpes}: unknown key 'train\.stpes'"),
    Case("config_range_error_and_missing_data", **train({"train.lr": "-1", "data.path": '"missing.tokens"'}),
         expect=r"{L:train.lr}: .*train\.lr"),
    Case("explain_unknown_key", ["explain", "--config", "c.toml"], {"c.toml": cfg({"model.moe.top_kk": "1"})},
         expect=r"{L:model.moe.top_kk}: unknown key 'model\.moe\.top_kk'.*did you mean 'model\.moe\.top_k'"),

    # --- --set ---
    Case("set_without_equals", **train(args=["--set", "train.steps"]), expect=r"--set 'train\.steps': expected dotted\.key=value"),
    Case("set_empty_key", **train(args=["--set", "=3"]), expect=r"--set '=3': expected dotted\.key=value"),
    Case("set_unknown_key", **train(args=["--set", "train.stpes=3"]),
         expect=r"--set train\.stpes=3: unknown key 'train\.stpes'.*did you mean 'train\.steps'"),
    Case("set_wrong_type", **train(args=["--set", "train.steps=abc"]),
         expect=r"--set train\.steps=abc: 'train\.steps' must be an integer, got a string"),
    Case("set_through_a_value", **train(args=["--set", "train.steps.x=1"]),
         expect=r"cannot set 'train\.steps\.x': 'steps' is not a table"),
    Case("set_batch_size_zero", **train(args=["--set", "train.batch_size=0"]),
         expect=r"--set train\.batch_size=0: train\.batch_size = 0 is out of range: it must be >= 1"),
    Case("set_lr_negative", **train(args=["--set", "train.lr=-1"]), expect=r"--set train\.lr=-1: .*train\.lr"),

    # --- the command line ---
    Case("cli_unknown_option", ["--frobnicate"], {}, r"unknown option '--frobnicate'"),
    Case("cli_missing_value", ["--config"], {}, r"--config needs a value"),
    Case("cli_unknown_command", ["frob"], {}, r"unknown command 'frob'"),
    Case("cli_unexpected_argument", **train(args=["extra"]), expect=r"unexpected argument 'extra'"),
    Case("cli_profile_steps", **train(args=["--profile", "abc"]), expect=r"--profile 'abc': expected N"),
    Case("cli_init_from_missing", **train(args=["--init-from", "nope.safetensors"]), expect=r"cannot open 'nope\.safetensors'"),
    Case("cli_launch_nproc_not_integer", ["launch", "--nproc", "2x", "--", "--config", "c.toml"], {"c.toml": cfg()},
         r"launch: --nproc takes an integer, got '2x'"),
    Case("cli_launch_master_without_port", ["launch", "--nproc", "1", "--master", "localhost"], {},
         r"launch: --master takes ADDR:PORT.*got 'localhost'"),
    Case("cli_generate_flag_in_training", **train(args=["--device", "cuda"]),
         expect=r"--device is a flag of `pithtrain generate`; for training set train\.device \(--set train\.device=\.\.\.\)"),
    Case("cli_convert_without_out", ["convert", "import", "hf"], hf_folder(), r"convert: needs --out DIR"),
    Case("data_train_vocab_not_integer",
         ["data", "build", "--tokenizer", "sentencepiece", "--train-vocab", "abc", "--out", "o.tokens", "in.txt"],
         {"in.txt": "hello\n"}, r"--train-vocab takes an integer, got 'abc'"),
    Case("data_train_vocab_trailing_text",
         ["data", "build", "--tokenizer", "sentencepiece", "--train-vocab", "12x", "--out", "o.tokens", "in.txt"],
         {"in.txt": "hello\n"}, r"--train-vocab takes an integer, got '12x'"),
    Case("data_without_out", ["data", "build", "in.txt"], {"in.txt": "hello\n"}, r"data build: needs --out FILE"),
    Case("data_missing_input", ["data", "build", "--out", "o.tokens", "nope.txt"], {},
         r"data input 'nope\.txt': no such file or folder"),
    Case("data_unknown_format", ["data", "build", "--format", "xml", "--out", "o.tokens", "in.txt"], {"in.txt": "hello\n"},
         r"data format 'xml' is unknown"),
    Case("data_unknown_tokenizer", ["data", "build", "--tokenizer", "gpt2", "--out", "o.tokens", "in.txt"], {"in.txt": "hello\n"},
         r"tokenizer 'gpt2' is unknown"),
    Case("data_jsonl_malformed_keeps_output", ["data", "build", "--out", "o.tokens", "in.jsonl"],
         {"in.jsonl": '{"text": "one"}\n{"text": "two"\n', "o.tokens": TOKENS}, r"in\.jsonl:2: malformed JSON"),
    Case("data_jsonl_without_text", ["data", "build", "--out", "o.tokens", "in.jsonl"], {"in.jsonl": '{"body": "x"}\n'},
         r'in\.jsonl:1: a \.jsonl line needs a string field "text"'),
    Case("data_gzip_damaged_keeps_output", ["data", "build", "--out", "o.tokens", "in.txt.gz"],
         {"in.txt.gz": crc_flipped(gzip.compress(b"hello\n" * 100)),
          "o.tokens": TOKENS}, r"'in\.txt\.gz': corrupt gzip data \(incorrect data check\).*gzip -t in\.txt\.gz"),
    Case("data_zstd_truncated", ["data", "build", "--out", "o.tokens", "in.jsonl.zst"], {"in.jsonl.zst": b"\x28\xb5\x2f\xfd\x04"},
         r"'in\.jsonl\.zst': the zstd data ends early.*zstd -t in\.jsonl\.zst"),
    Case("data_parquet_needs_offline_step", ["data", "build", "--out", "o.tokens", "in.parquet"], {"in.parquet": b"PAR1\0\0PAR1"},
         r"'in\.parquet' is Parquet: convert it first with .*scripts/parquet_to_jsonl\.py"),
    Case("eval_missing_run", ["eval", "--run", "nope"], {}, r"eval: run directory 'nope' does not exist"),
    Case("eval_without_run", ["eval"], {}, r"eval: needs --run RUN_DIR"),
    Case("generate_without_run", ["generate", "--prompt", "x"], {}, r"generate: needs --run RUN_DIR .*or --config FILE with --weights FILE"),
    Case("generate_missing_run", ["generate", "--run", "nope", "--prompt", "x"], {}, r"generate: run directory 'nope' does not exist"),
    Case("generate_run_and_config", ["generate", "--run", "run", "--config", "c.toml", "--prompt", "x"], {"c.toml": cfg()},
         r"generate: pass --run RUN_DIR, or --config FILE with --weights FILE, not both"),
    Case("generate_config_without_weights", ["generate", "--config", "c.toml", "--prompt", "x"], {"c.toml": cfg()},
         r"generate: --config needs --weights FILE"),
    Case("generate_weights_missing", ["generate", "--config", "c.toml", "--weights", "nope.safetensors", "--prompt", "x"],
         {"c.toml": cfg()}, r"generate: --weights 'nope\.safetensors': no such file"),
    Case("generate_without_prompt", ["generate", "--run", "run"], {}, r"generate: needs --prompt TEXT"),
    Case("generate_negative_temperature", ["generate", "--run", "run", "--prompt", "x", "--temperature", "-1"], {},
         r"generate: --temperature is -1; it must be a finite number >= 0"),
    Case("generate_temperature_not_a_number", ["generate", "--run", "run", "--prompt", "x", "--temperature", "warm"], {},
         r"--temperature takes a number, got 'warm'"),
    Case("generate_top_p_above_one", ["generate", "--run", "run", "--prompt", "x", "--top-p", "1.5"], {},
         r"generate: --top-p is 1\.5; it must be in \(0, 1\]"),
    Case("generate_no_tokens", ["generate", "--run", "run", "--prompt", "x", "--max-tokens", "0"], {},
         r"generate: --max-tokens is 0; it must be at least 1"),
    Case("generate_negative_seed", ["generate", "--run", "run", "--prompt", "x", "--seed", "-3"], {}, r"--seed takes an integer >= 0, got -3"),
    Case("generate_unknown_device", ["generate", "--run", "run", "--prompt", "x", "--device", "tpu"], {"run": RunCopy()},
         r"generate: --device 'tpu': use cpu, cuda or cuda:N"),
    Case("generate_device_absent", ["generate", "--run", "run", "--prompt", "x", "--device", "cuda:99"], {"run": RunCopy()},
         r"generate: --device is 'cuda:99' but this machine has \d+ usable GPU\(s\); pass --device cpu"),
    Case("generate_tokenizer_unknown", ["generate", "--run", "run", "--prompt", "x"], {"run": RunCopy()},
         r"generate: cannot tell which tokenizer the run used: its data\.path 'data\.tokens' .*pass --tokenizer bytes"),
    Case("generate_tokenizer_missing", ["generate", "--run", "run", "--prompt", "x", "--tokenizer", "nope.model"], {"run": RunCopy()},
         r"generate: --tokenizer 'nope\.model': no such file"),
    Case("data_sentencepiece_model_missing",
         ["data", "build", "--tokenizer", "sentencepiece", "--tokenizer-model", "nope.model", "--out", "o.tokens", "in.txt"],
         {"in.txt": "hello\n"}, r"SentencePiece model 'nope\.model'"),

    # --- plugin files ---
    Case("plugin_missing_path", **train(args=["--plugins", "./lib/router_nope.so"]),
         expect=r"--plugins \./lib/router_nope\.so: no such file"),
    Case("plugin_not_on_search_path", **train(args=["--plugins", "router_nope.so"]),
         expect=r"--plugins router_nope\.so: no such file on the plugin search path"),
    Case("plugin_badly_named", **train(args=["--plugins", "./libfoo.so"], files={"libfoo.so": b"\x7fELF"}),
         expect=r"plugin \./libfoo\.so: plugin files are named <kind>_<name>\.so"),
    Case("plugin_not_a_library", ["plugin", "check", "./router_junk.so"], {"router_junk.so": b"not a shared library\n"},
         r"plugin \./router_junk\.so: cannot be loaded as a shared library"),
    Case("plugin_empty_file", **train(args=["--plugins", "./router_empty.so"], files={"router_empty.so": b""}),
         expect=r"plugin \S*/router_empty\.so: cannot be loaded as a shared library"),
    Case("plugin_truncated_library", ["plugin", "check", "./router_silent_loss.so"],
         {"router_silent_loss.so": Copy(lambda options, fixtures: Path(options.broken_plugins) / "router_silent_loss.so", 0.5)},
         r"plugin \./router_silent_loss\.so: cannot be loaded as a shared library: it is truncated or damaged"),
    Case("plugin_bad_abi", ["plugin", "check", "./router_bad_abi.so"], {"router_bad_abi.so": broken("router_bad_abi.so")},
         r"plugin \./router_bad_abi\.so: plugin ABI \d+, this pithtrain supports \d+"),
    Case("plugin_other_libtorch", ["plugin", "check", "./router_old_torch.so"], {"router_old_torch.so": broken("router_old_torch.so")},
         r"plugin \./router_old_torch\.so: built against LibTorch .*, this pithtrain uses LibTorch"),
    Case("plugin_no_entry_symbol", ["plugin", "check", "./router_no_entry.so"], {"router_no_entry.so": broken("router_no_entry.so")},
         r"plugin \./router_no_entry\.so: has no entry symbol 'pithtrain_plugin'"),
    Case("plugin_descriptor_name_mismatch", ["plugin", "check", "./router_misnamed.so"],
         {"router_misnamed.so": broken("router_misnamed.so")},
         r"plugin \./router_misnamed\.so: its descriptor says kind 'router', name '\w+', but the file name says 'router', 'misnamed'"),
    Case("plugin_two_files_one_name", **train({"model.moe.router.plugin": '"silent_loss"'},
                                              files={"a/router_silent_loss.so": broken("router_silent_loss.so"),
                                                     "b/router_silent_loss.so": broken("router_silent_loss.so")}),
         env={"PITHTRAIN_PLUGIN_PATH": "{dir}/a:{dir}/b"},
         expect=r"two files provide router plugin 'silent_loss': .*/a/router_silent_loss\.so and .*/b/router_silent_loss\.so"),

    # --- token files ---
    Case("tokens_missing", **train({"data.path": '"nope.tokens"'}),
         expect=r"dataset 'nope\.tokens': cannot open \(No such file or directory\)"),
    Case("tokens_too_short", **train(files={"data.tokens": TOKENS[:10]}),
         expect=r"dataset 'data\.tokens': 10 bytes, too short for a token file"),
    Case("tokens_truncated", **train(files={"data.tokens": TOKENS[:-7]}),
         expect=r"dataset 'data\.tokens': size is \d+ bytes but the header promises 3000 tokens of 2 bytes plus its 64-byte "
                r"header \(truncated or corrupt\)"),
    Case("tokens_wrong_magic", **train(files={"data.tokens": token_file(magic=b"PTTOKENZ")}),
         expect=r"dataset 'data\.tokens': not a PithTrain token file \(bad magic\)"),
    Case("tokens_other_version", **train(files={"data.tokens": token_file(version=2)}),
         expect=r"dataset 'data\.tokens': format version 2, this pithtrain reads 1"),
    Case("tokens_odd_width", **train(files={"data.tokens": token_file(width=3)}),
         expect=r"dataset 'data\.tokens': unsupported token width 3"),
    Case("tokens_bit_flipped", **train(files={"data.tokens": flip_bit(TOKENS, 1000, 3)}),
         expect=r"dataset 'data\.tokens': checksum mismatch"),
    Case("tokens_id_above_vocab", **train(files={"data.tokens": token_file(ids=[1, 2, 300, 256] * 100)}),
         expect=r"dataset 'data\.tokens': token 2 is 300, not below the header's vocab_size 257"),
    Case("tokens_count_overflows", **train(files={"data.tokens": token_file(ids=[], num_tokens=1 << 63, checksum=0)}),
         expect=r"dataset 'data\.tokens': .*header promises .*\(truncated or corrupt\)"),
    Case("tokens_path_is_a_folder", **train({"data.path": '"folder"'}, files={"folder/readme.txt": "not a token file\n"}),
         expect=r"dataset 'folder': not a regular file"),
    Case("tokens_too_few_for_seq_len", **train(files={"data.tokens": token_file(ids=[1] * 10)}),
         expect=r"data\.tokens.*train\.seq_len"),

    # --- checkpoints ---
    Case("init_from_truncated", **train(args=INIT, files={"ck.safetensors": ck(lambda d: d[:len(d) * 3 // 5])}),
         expect=r"'ck\.safetensors' is damaged"),
    Case("init_from_bit_flipped", **train(args=INIT,
                                          files={"ck.safetensors": ck(lambda d: flip_bit(d, data_offset(d), 5))}),
         expect=r"'ck\.safetensors' is damaged: checksum mismatch"),
    Case("init_from_header_bit_flipped", **train(args=INIT, files={"ck.safetensors": ck(lambda d: flip_bit(d, 8, 1))}),
         expect=r"'ck\.safetensors' is damaged"),
    Case("init_from_other_model", **train({"model.hidden_size": "24"}, args=INIT, files={"ck.safetensors": ck()}),
         expect=r"'ck\.safetensors': tensor '(model/)?embedding\.weight' has shape \[257, 16\] but the model has \[257, 24\]"),
    Case("init_from_not_safetensors", **train(args=INIT, files={"ck.safetensors": "just some text\n" * 4}),
         expect=r"'ck\.safetensors' has a header larger than the file"),
    Case("init_from_empty", **train(args=INIT, files={"ck.safetensors": b""}), expect=r"'ck\.safetensors' is too short"),
    Case("export_truncated_weights", EXPORT,
         {"c.toml": cfg({"model.hf_architecture": '"qwen3_moe"'}), "ck.safetensors": ck(lambda d: d[:len(d) // 2])},
         r"'ck\.safetensors' is damaged"),
    Case("export_weights_of_other_model", EXPORT,
         {"c.toml": cfg({"model.hf_architecture": '"qwen3_moe"'}), "ck.safetensors": ck(), "hf_out/config.json": "{}\n"},
         r"ck\.safetensors: tensor '(model/)?layers\.0\.attention\.q_norm' is missing"),
    Case("export_unknown_architecture", EXPORT,
         {"c.toml": cfg({"model.hf_architecture": '"llama"'}), "ck.safetensors": ck()},
         r"c\.toml: model_type 'llama' is not supported by pithtrain convert \(supported: qwen3_moe"),

    # --- run directories ---
    Case("run_resume_other_model", **train({"model.num_layers": "2"}, args=["--out", "run"], files={"run": RunCopy()}),
         expect=r"checkpoint '.*run/checkpoints/step_0+2\.safetensors' was written for a different \[model\] config"),
    Case("run_fresh_into_other_run", **train(args=["--out", "run", "--set", "checkpoint.resume=false"], files={"run": RunCopy()}),
         expect=r"\brun\b.*--out"),
    Case("run_checkpoint_truncated",
         **train(args=["--out", "run"], files={"run": RunCopy(checkpoint_edit(lambda d: d[:len(d) // 2]))}),
         expect=r"run/checkpoints/step_0+2\.safetensors.*damaged"),
    Case("run_checkpoint_data_bit_flipped", **train(args=["--out", "run"],
                                                    files={"run": RunCopy(checkpoint_edit(lambda d: flip_bit(d, data_offset(d), 2)))}),
         expect=r"run/checkpoints/step_0+2\.safetensors.*damaged"),
    Case("run_checkpoint_metadata_bit_flipped",
         **train(args=["--out", "run"],
                 files={"run": RunCopy(checkpoint_edit(lambda d: flip_bit(d, metadata_digit_offset(d, "data_position"), 0)))}),
         expect=r"run/checkpoints/step_0+2\.safetensors.*damaged"),
    Case("run_out_is_a_file", **train(args=["--out", "afile"], files={"afile": "not a folder\n"}),
         expect=r"cannot create directories: .*\bafile\b"),
    Case("plot_without_metrics", ["plot", "empty"], {"empty/readme.txt": "no run here\n"}, r"no metrics at 'empty/metrics\.jsonl'"),
    Case("plot_malformed_metrics", ["plot", "run"],
         {"run": RunCopy(lambda run, fixtures: (run / "metrics.jsonl").write_text(
             (run / "metrics.jsonl").read_text().splitlines()[0] + '\n{"step": 2, "loss"\n'))},
         r"run/metrics\.jsonl:2: malformed JSON", needs=("gnuplot",)),

    # --- Hugging Face folders (pithtrain convert import) ---
    Case("hf_no_config", IMPORT, {"hf/readme.txt": "empty\n"}, r"cannot read 'hf/config\.json'"),
    Case("hf_config_not_json", IMPORT, {"hf/config.json": '{"model_type": "qwen3_moe",'},
         r"hf/config\.json: malformed JSON"),
    Case("hf_unknown_architecture", IMPORT, hf_folder({"model_type": "llama"}),
         r"hf/config\.json: model_type 'llama' is not supported by pithtrain convert \(supported: qwen3_moe"),
    Case("hf_no_model_type", IMPORT, hf_folder(drop_keys=["model_type"]),
         r"hf/config\.json: missing 'model_type'"),
    Case("hf_missing_config_key", IMPORT, hf_folder(drop_keys=["hidden_size"]),
         r"hf/config\.json: missing 'hidden_size'"),
    Case("hf_config_key_not_a_number", IMPORT, hf_folder({"hidden_size": "16"}),
         r"hf/config\.json: 'hidden_size' must be a number"),
    Case("hf_quantized", IMPORT, hf_folder({"quantization_config": {"quant_method": "mxfp4"}}),
         r"hf/config\.json: a quantized checkpoint \(quantization_config\) is not supported"),
    Case("hf_unsupported_rope", IMPORT, hf_folder({"rope_scaling": {"rope_type": "dynamic"}}),
         r"hf/config\.json: rope_type 'dynamic' is not supported"),
    Case("hf_no_weights", IMPORT, hf_folder(weights=False),
         r"hf: has neither model\.safetensors nor model\.safetensors\.index\.json"),
    Case("hf_missing_tensor", IMPORT, hf_folder(drop_tensors=[Q_PROJ]),
         r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is missing"),
    Case("hf_wrong_shape", IMPORT, hf_folder(tensor_changes={Q_PROJ: (16, 12)}),
         r"hf/model\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[16, 12\], "
         r"config\.json implies \[16, 16\]"),
    Case("hf_extra_tensor", IMPORT, hf_folder(tensor_changes={"model.layers.0.mlp.shared_expert.weight": (4,)}),
         r"hf/model\.safetensors: tensor 'model\.layers\.0\.mlp\.shared_expert\.weight' has no place in a PithTrain qwen3_moe model"),
    Case("hf_unsupported_dtype", IMPORT, hf_folder(tensor_changes={Q_PROJ: ("F8_E4M3", (16, 16))}),
         r"hf/model\.safetensors': tensor model\.layers\.0\.self_attn\.q_proj\.weight has unsupported dtype F8_E4M3"),
    Case("hf_truncated_weights", IMPORT,
         {**hf_folder(), "hf/model.safetensors": safetensors(hf_tensors())[:-100]}, r"'hf/model\.safetensors'.*truncated"),
    Case("hf_index_without_weight_map", IMPORT,
         {**hf_folder(weights=False), "hf/model.safetensors.index.json": '{"metadata": {}}'},
         r"hf/model\.safetensors\.index\.json: missing 'weight_map'"),
    Case("hf_index_names_missing_shard", IMPORT,
         {**hf_folder(weights=False), "hf/model.safetensors.index.json":
          json.dumps({"weight_map": {name: "model-00001-of-00001.safetensors" for name in hf_tensors()}})},
         r"hf/model\.safetensors\.index\.json: lists shard 'model-00001-of-00001\.safetensors' .*does not exist"),
    Case("hf_shard_truncated", IMPORT, hf_sharded_folder({2: lambda data: data[:-100]}),
         r"'hf/model-00002-of-00002\.safetensors': tensor .* lies outside the file \(truncated\?\); it is damaged or not a "
         r"safetensors file; download it again"),
    Case("hf_shard_not_safetensors", IMPORT, hf_sharded_folder({1: lambda data: b"<html>404 Not Found</html>\n"}),
         r"'hf/model-00001-of-00002\.safetensors' has a header larger than the file; it is damaged or not a safetensors file; "
         r"download it again"),
    Case("hf_shard_empty", IMPORT, hf_sharded_folder({2: lambda data: b""}),
         r"'hf/model-00002-of-00002\.safetensors' is too short; it is damaged or not a safetensors file; download it again"),
    Case("hf_shard_lacks_tensor", IMPORT, hf_sharded_folder(move_in_index={Q_PROJ: 2}),
         r"hf/model-00002-of-00002\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is missing "
         r"\(model\.safetensors\.index\.json lists it in this shard: download the shard again\)"),
    Case("hf_out_is_a_file", ["convert", "import", "hf", "--out", "afile"], {**hf_folder(), "afile": "not a folder\n"},
         r"--out afile: cannot create the folder"),
    Case("hf_failed_import_keeps_out", IMPORT,
         {**hf_folder(drop_tensors=[Q_PROJ]), "out/config.toml": "# an earlier import\n[model]\nvocab_size = 32\n",
          "out/model.safetensors": safetensors({"x": (2,)})},
         r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is missing"),
]

# Good inputs that must work, so that each family's bad cases fail for the reason they name.
CONTROLS = [
    Case("control_hf_import", IMPORT, hf_folder(), ""),
    Case("control_hf_sharded_import", IMPORT, hf_sharded_folder(), ""),
    Case("control_data_build", ["data", "build", "--out", "o.tokens", "in.jsonl"],
         {"in.jsonl": '{"text": "one"}\n{"text": "two"}\n'}, ""),
    Case("control_init_from", **train(args=[*INIT, "--set", "train.steps=1"], files={"ck.safetensors": ck()}), expect=""),
    Case("control_generate", ["generate", "--run", "run", "--prompt", "x", "--max-tokens", "4"], {"run": RunCopy(), "data.tokens": TOKENS}, ""),
]

# ---------------------------------------------------------------------------------------------------
# Running a case.


def case_environment(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PITHTRAIN_")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})
    return env


def write_files(case, work, options, fixtures):
    for relative, content in case.files.items():
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content = content(fixtures)
        if isinstance(content, RunCopy):
            shutil.copytree(fixtures.run_dir(), path)
            if content.edit:
                content.edit(path, fixtures)
        elif isinstance(content, Copy):
            data = Path(content.source(options, fixtures)).read_bytes()
            path.write_bytes(data[:int(len(data) * content.truncate_to)])
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def snapshot(work):
    return {str(path.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(work.rglob("*")) if path.is_file() and not path.is_symlink()}


def expected_pattern(case, work):
    def location(match):
        return re.escape(f"c.toml:{line_of((work / 'c.toml').read_text(), match.group(1))}")
    return re.sub(r"\{L:([\w.]+)\}", location, case.expect)


def run_case(case, options, fixtures, control=False):
    """Returns (problems, seconds): what the case got wrong, empty when it behaved."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=case.name + ".", dir=options.scratch))
    write_files(case, work, options, fixtures)
    before = snapshot(work)
    env = case_environment({key: value.replace("{dir}", str(work)) for key, value in case.env.items()})
    try:
        result = subprocess.run([options.bin, *case.command], cwd=work, capture_output=True, text=True, errors="replace",
                                env=env, timeout=120)
    except subprocess.TimeoutExpired:
        return [f"no answer within 120 s: {case.command}"], time.monotonic() - started
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    problems = []
    if control:
        if result.returncode != 0:
            problems.append(f"exit {result.returncode} on good input: {last}")
    else:
        if result.returncode == 0:
            problems.append("exit 0 on bad input")
        elif result.returncode < 0 or result.returncode >= 128:
            problems.append(f"killed or crashed (exit {result.returncode})")
        if not last.startswith("pithtrain: error: "):
            problems.append(f"the last line of stderr is not one 'pithtrain: error: ...' line: {last!r}")
        elif not re.search(expected_pattern(case, work), last):
            problems.append(f"the error line lacks /{expected_pattern(case, work)}/: {last!r}")
        crash = CRASH_TEXT.search(output)
        if crash:
            problems.append(f"crash text in the output: {crash.group(0)!r}")
        after = snapshot(work)
        changed = [name for name, digest in before.items() if after.get(name) != digest]
        if changed:
            problems.append("changed or removed files that existed before: " + ", ".join(changed[:6]) +
                            (f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""))
    if problems:
        problems.append("command: pithtrain " + " ".join(case.command) + "\n      output tail: " +
                        "\n      ".join(output.strip().splitlines()[-6:]))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return problems, time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", required=True)
    parser.add_argument("--broken-plugins", required=True, help="the build's test_plugins folder (tests/CMakeLists.txt)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("-k", default="", help="run only cases whose name contains this")
    options = parser.parse_args()
    options.bin = str(Path(options.bin).resolve())
    options.broken_plugins = str(Path(options.broken_plugins).resolve())
    strict = bool(os.environ.get("PITHTRAIN_BAD_INPUT_STRICT"))
    names = [case.name for case in CASES + CONTROLS]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        sys.exit(f"duplicate case names: {sorted(duplicates)}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pithtrain_bad_input.") as scratch:
        options.scratch = scratch
        fixtures = Fixtures(options.bin, scratch)
        fixtures.run_dir()  # also the first control: the good config trains
        selected = [(case, False) for case in CASES if options.k in case.name]
        selected += [(case, True) for case in CONTROLS if options.k in case.name]
        runnable = []
        for case, control in selected:
            missing = [tool for tool in case.needs if shutil.which(tool) is None]
            if missing:
                print(f"SKIP  {case.name}: needs {', '.join(missing)}")
            else:
                runnable.append((case, control))
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
            futures = [(case, control, pool.submit(run_case, case, options, fixtures, control)) for case, control in runnable]
            failed, expected_failures, unexpected_passes = [], [], []
            for case, control, future in futures:
                problems, seconds = future.result()
                if case.pending and not strict:
                    status = "XFAIL" if problems else "XPASS"
                    (expected_failures if problems else unexpected_passes).append(case.name)
                else:
                    status = "FAIL " if problems else "ok   "
                    if problems:
                        failed.append(case.name)
                print(f"{status} {case.name} ({seconds:.1f} s)" + (f"  [pending: {case.pending}]" if case.pending else ""))
                if problems and (status == "FAIL " or os.environ.get("PITHTRAIN_BAD_INPUT_VERBOSE")):
                    for problem in problems:
                        print("      " + problem)
                sys.stdout.flush()
        print(f"bad_input: {len(runnable)} run ({len([c for c in runnable if not c[1]])} bad-input cases, "
              f"{len([c for c in runnable if c[1]])} controls), {len(failed)} failed, {len(expected_failures)} pending (XFAIL), "
              f"{len(unexpected_passes)} pending that now pass (XPASS: mark them strict), {time.monotonic() - started:.0f} s"
              + ("" if strict else "; PITHTRAIN_BAD_INPUT_STRICT=1 makes pending cases count"))
        if failed:
            print("failed: " + " ".join(failed))
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
