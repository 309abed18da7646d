#!/usr/bin/env python3
"""ctest `convert_shards`: `pithtrain convert import` of a sharded Hugging Face folder (model.safetensors.index.json
and three shards, one layer's experts split across two of them) writes the same model.safetensors as the import of
the same weights in one model.safetensors: the same header entries in the same order and byte-identical tensor data,
which equal the Hugging Face tensors (the experts stacked by torch here); the whole-file checksum verifies (computed
here, independently); the export of the sharded import gives back every Hugging Face tensor; and a damaged
checksummed file is refused naming it, with nothing written.

Args: PITHTRAIN_BINARY (run with the venv's python: torch and safetensors)."""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, EXPERTS, INNER = 256, 64, 2, 4, 2, 16, 8, 32
CONFIG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB, "hidden_size": HIDDEN,
          "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
          "num_experts": EXPERTS, "num_experts_per_tok": 2, "moe_intermediate_size": INNER, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "norm_topk_prob": True}
EXPERT_NAMES = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}


def hf_weights():
    """name -> tensor, in the order transformers lists them; norms in float32, the rest in bfloat16 (both kept)."""
    generator = torch.Generator().manual_seed(3)

    def tensor(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=generator).to(dtype)

    weights = {"model.embed_tokens.weight": tensor(VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        weights.update({p + "input_layernorm.weight": tensor(HIDDEN, dtype=torch.float32),
                        p + "post_attention_layernorm.weight": tensor(HIDDEN, dtype=torch.float32),
                        p + "self_attn.q_proj.weight": tensor(HEADS * HEAD_DIM, HIDDEN),
                        p + "self_attn.k_proj.weight": tensor(KV_HEADS * HEAD_DIM, HIDDEN),
                        p + "self_attn.v_proj.weight": tensor(KV_HEADS * HEAD_DIM, HIDDEN),
                        p + "self_attn.o_proj.weight": tensor(HIDDEN, HEADS * HEAD_DIM),
                        p + "self_attn.q_norm.weight": tensor(HEAD_DIM, dtype=torch.float32),
                        p + "self_attn.k_norm.weight": tensor(HEAD_DIM, dtype=torch.float32),
                        p + "mlp.gate.weight": tensor(EXPERTS, HIDDEN)})
        for expert in range(EXPERTS):
            e = f"{p}mlp.experts.{expert}."
            weights.update({e + "gate_proj.weight": tensor(INNER, HIDDEN), e + "up_proj.weight": tensor(INNER, HIDDEN),
                            e + "down_proj.weight": tensor(HIDDEN, INNER)})
    weights.update({"model.norm.weight": tensor(HIDDEN, dtype=torch.float32), "lm_head.weight": tensor(VOCAB, HIDDEN)})
    return weights


def header(path):
    """(entries in file order as [(name, entry)], metadata, the data section's bytes) of a safetensors file."""
    data = Path(path).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    members = json.loads(data[8:8 + size], object_pairs_hook=list)
    metadata = dict(next((value for name, value in members if name == "__metadata__"), []))
    return [(name, dict(entry)) for name, entry in members if name != "__metadata__"], metadata, data[8 + size:]


def whole_file_checksum(path):
    """FNV-1a 64 over the file with its file_checksum digits read as zeros (docs/training.md), and the stored digits."""
    data = bytearray(Path(path).read_bytes())
    at = data.index(b'"file_checksum":"') + len('"file_checksum":"')
    stored = data[at:at + 16].decode()
    data[at:at + 16] = b"0" * 16
    value = 14695981039346656037
    for byte in data:
        value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}", stored


def run(binary, *args, expect_ok=True):
    result = subprocess.run([binary, *args], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if expect_ok and result.returncode != 0:
        sys.exit(f"FAIL: pithtrain {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def main():
    binary = sys.argv[1]
    work = Path(tempfile.mkdtemp(prefix="convert_shards."))
    try:
        weights = hf_weights()
        single, sharded = work / "single", work / "sharded"
        for folder in (single, sharded):
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
        save_file(weights, single / "model.safetensors", metadata={"format": "pt"})
        # Three shards by count of tensors: the first cut falls inside layer 0's experts.
        names = list(weights)
        cuts = [0, len(names) // 5, 2 * len(names) // 3, len(names)]
        assert "mlp.experts." in names[cuts[1]] and "mlp.experts." in names[cuts[1] - 1], "the cut splits a layer's experts"
        weight_map = {}
        for number in range(3):
            file = f"model-{number + 1:05d}-of-00003.safetensors"
            part = {name: weights[name] for name in names[cuts[number]:cuts[number + 1]]}
            save_file(part, sharded / file, metadata={"format": "pt"})
            weight_map.update({name: file for name in part})
        (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))

        run(binary, "convert", "import", str(single), "--out", str(work / "from_single"))
        run(binary, "convert", "import", str(sharded), "--out", str(work / "from_shards"))
        a_entries, a_meta, a_data = header(work / "from_single" / "model.safetensors")
        b_entries, b_meta, b_data = header(work / "from_shards" / "model.safetensors")
        assert a_entries == b_entries, "the two imports' headers list different tensors, dtypes, shapes or order"
        assert a_data == b_data, "the two imports' tensor bytes differ"
        differing = {key for key in set(a_meta) | set(b_meta) if a_meta.get(key) != b_meta.get(key)}
        assert differing <= {"source", "file_checksum"}, f"metadata differs beyond the source folder: {differing}"
        for path in (work / "from_single" / "model.safetensors", work / "from_shards" / "model.safetensors"):
            computed, stored = whole_file_checksum(path)
            assert computed == stored, f"{path}: checksum {stored} stored, {computed} computed"

        # Against the Hugging Face tensors: plain ones as they are, experts stacked into [E, out, in].
        imported = load_file(work / "from_shards" / "model.safetensors")
        assert len(imported) == len(weights) - LAYERS * 3 * (EXPERTS - 1), f"{len(imported)} tensors imported"
        expected = {"embedding.weight": weights["model.embed_tokens.weight"], "lm_head.weight": weights["lm_head.weight"],
                    "final_norm.weight": weights["model.norm.weight"]}
        for layer in range(LAYERS):
            p = f"model.layers.{layer}."
            expected[f"layers.{layer}.attention.q_proj"] = weights[p + "self_attn.q_proj.weight"]
            expected[f"layers.{layer}.attention_norm.weight"] = weights[p + "input_layernorm.weight"]
            expected[f"layers.{layer}.router.gate.weight"] = weights[p + "mlp.gate.weight"]
            for ours, theirs in EXPERT_NAMES.items():
                expected[f"layers.{layer}.experts.{ours}"] = torch.stack(
                    [weights[f"{p}mlp.experts.{e}.{theirs}.weight"] for e in range(EXPERTS)])
        for name, tensor in expected.items():
            got = imported[name]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), f"{name}: differs from the Hugging Face tensors"

        # The export of the sharded import gives back every Hugging Face tensor exactly.
        run(binary, "convert", "export", "--config", str(work / "from_shards" / "config.toml"), "--weights",
            str(work / "from_shards" / "model.safetensors"), "--out", str(work / "exported"))
        exported = load_file(work / "exported" / "model.safetensors")
        assert set(exported) == set(weights), "the export names other tensors than the Hugging Face folder"
        for name, tensor in weights.items():
            assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), f"{name} changed in the round trip"

        # A checksummed file (this export) with one flipped bit in its data is refused, naming the file; nothing is written.
        damaged = work / "damaged"
        shutil.copytree(work / "exported", damaged)
        data = bytearray((damaged / "model.safetensors").read_bytes())
        data[len(data) * 2 // 3] ^= 0x10
        (damaged / "model.safetensors").write_bytes(bytes(data))
        result = run(binary, "convert", "import", str(damaged), "--out", str(work / "from_damaged"), expect_ok=False)
        assert result.returncode != 0 and "model.safetensors' is damaged: checksum mismatch" in result.stderr, result.stderr
        assert not (work / "from_damaged").exists(), "a refused import created its --out folder"
        print(f"ok: {len(weights)} Hugging Face tensors in 1 file and in 3 shards import to the same {len(imported)} tensors, "
              f"{len(a_data)} data bytes; checksums verify; the export gives them back; a damaged file is refused")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
