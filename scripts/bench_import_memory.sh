#!/usr/bin/env bash
# Peak resident memory of `pithtrain convert import` on a generated multi-shard Hugging Face folder: a
# qwen3_moe model in bf16 (hidden 2048, 64 experts of width 768, vocabulary 32000, as many layers as it
# takes to reach --gb), written with the venv's safetensors package as shards of about 500 MB and a
# model.safetensors.index.json. Runs the import under /usr/bin/time -v (or reads VmHWM from /proc when it
# is missing) and prints the peak resident memory, the folder's size, the largest tensor on either side
# (the largest Hugging Face tensor, and the largest PithTrain tensor: one layer's experts stacked into
# [E, F, H]) and the wall time. The generated folder and the import's output are deleted at the end
# unless --keep.
# Usage: scripts/bench_import_memory.sh [--gb N] [--work DIR] [--keep]
set -euo pipefail
gb=2.5; work_parent=${TMPDIR:-/tmp}; keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --gb) gb=$2; shift 2 ;;
    --work) work_parent=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "bench_import_memory.sh: unknown argument $1 (--gb N, --work DIR, --keep)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
bin=${PITHTRAIN_BIN:-${PITHTRAIN_BUILD_DIR:-build}/bin/pithtrain}
[ -x "$bin" ] || bash scripts/build.sh
eval "$(bash scripts/setup.sh)"  # PITHTRAIN_VENV: the venv with torch and safetensors
python=$PITHTRAIN_VENV/bin/python
work=$(mktemp -d "$work_parent/bench_import.XXXXXX")
[ "$keep" = 1 ] || trap 'rm -rf "$work"' EXIT
hf=$work/hf; out=$work/imported

"$python" - "$hf" "$gb" <<'PY'
import json, math, os, sys
import torch
from safetensors.torch import save_file

folder, target_gb = sys.argv[1], float(sys.argv[2])
vocab, hidden, heads, kv_heads, head_dim, experts, inner = 32000, 2048, 16, 4, 128, 64, 768
fixed = 2 * vocab * hidden * 2                                                     # embedding, lm_head (bf16)
per_layer = 2 * (experts * 3 * inner * hidden + (2 * heads + 2 * kv_heads) * head_dim * hidden + experts * hidden)
layers = max(1, math.ceil((target_gb * 2**30 - fixed) / per_layer))
config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": vocab, "hidden_size": hidden,
          "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
          "num_experts": experts, "num_experts_per_tok": 8, "moe_intermediate_size": inner, "intermediate_size": 4 * hidden,
          "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "norm_topk_prob": True, "tie_word_embeddings": False,
          "torch_dtype": "bfloat16"}
shapes = [("model.embed_tokens.weight", (vocab, hidden))]
for layer in range(layers):
    p = f"model.layers.{layer}."
    shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
               (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)), (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
               (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)), (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
               (p + "self_attn.q_norm.weight", (head_dim,)), (p + "self_attn.k_norm.weight", (head_dim,)),
               (p + "mlp.gate.weight", (experts, hidden))]
    for expert in range(experts):
        e = f"{p}mlp.experts.{expert}."
        shapes += [(e + "gate_proj.weight", (inner, hidden)), (e + "up_proj.weight", (inner, hidden)), (e + "down_proj.weight", (hidden, inner))]
shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

os.makedirs(folder)
with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
generator = torch.Generator().manual_seed(0)
noise = (torch.randn(1 << 24, generator=generator) * 0.02).to(torch.bfloat16)  # 32 MB, reused at random offsets
shard_limit, shards, current, size, total = 500 << 20, [], {}, 0, 0
for name, shape in shapes:
    count = math.prod(shape)
    start = int(torch.randint(0, noise.numel() - 1, (1,), generator=generator))
    tensor = noise.roll(-start).repeat(count // noise.numel() + 1)[:count].reshape(shape).clone()
    if current and size + 2 * count > shard_limit:
        shards.append(current); current, size = {}, 0
    current[name] = tensor; size += 2 * count; total += 2 * count
shards.append(current)
weight_map = {}
for number, tensors in enumerate(shards, 1):
    file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in tensors})
with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
largest = max(shapes, key=lambda item: math.prod(item[1]))
print(f"generated: qwen3_moe, {layers} layers, {len(shapes)} tensors in {len(shards)} shards")
print(f"largest Hugging Face tensor: {largest[0]} {list(largest[1])}, {2 * math.prod(largest[1]) / 2**20:.0f} MiB")
print(f"largest PithTrain tensor: layers.N.experts.gate_proj [{experts}, {inner}, {hidden}], {2 * experts * inner * hidden / 2**20:.0f} MiB")
PY

folder_bytes=$(du -sb "$hf" | cut -f1)
echo "folder: $hf, $(awk -v b="$folder_bytes" 'BEGIN { printf "%.2f GiB", b / 2^30 }') ($folder_bytes bytes)"
sync  # the shards are on disk, so the import's time is not spent flushing them
start=$(date +%s.%N)
if [ -x /usr/bin/time ]; then
  OMP_NUM_THREADS=1 /usr/bin/time -v "$bin" convert import "$hf" --out "$out" >"$work/import.log" 2>&1 || { cat "$work/import.log"; exit 1; }
  peak_kb=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$work/import.log")
else  # the high-water mark from /proc, sampled until the process ends
  OMP_NUM_THREADS=1 "$bin" convert import "$hf" --out "$out" >"$work/import.log" 2>&1 & pid=$!
  peak_kb=0
  while kill -0 "$pid" 2>/dev/null; do
    hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)
    [ -n "$hwm" ] && peak_kb=$hwm
    sleep 0.05
  done
  wait "$pid" || { cat "$work/import.log"; exit 1; }
fi
end=$(date +%s.%N)
out_bytes=$(stat -c %s "$out/model.safetensors")
awk -v kb="$peak_kb" -v fb="$folder_bytes" -v ob="$out_bytes" -v s="$start" -v e="$end" 'BEGIN {
  printf "output: model.safetensors, %.2f GiB\n", ob / 2^30
  printf "peak resident memory: %.0f MiB (%.1f%% of the folder)\n", kb / 1024, 100 * kb * 1024 / fb
  printf "import time: %.1f s\n", e - s }'
