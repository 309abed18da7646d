#!/usr/bin/env bash
# GPU speed (run where a GPU machine is lent): one training step of a Qwen3-30B-A3B-shaped layer stack
# (hidden 2048, 128 experts top-8, expert FFN 768, GQA 32/4 heads of 128 with per-head QK norm, softmax
# router, sequences of 4096, bfloat16) in PithTrain against the same model as a PyTorch eager loop and
# under torch.compile (scripts/bench_eager.py, bfloat16 autocast over float32 parameters). Reports
# tokens/s (median of the steps after the first two), MFU against --peak-tflops (dense bf16 matrix
# multiply rate of the GPU; default 800, what an H100 sustains) using PithTrain's own FLOP count per
# token for all three, and peak memory.
# The torch.compile run gets --compile-timeout seconds (default 300), compilation included; past it the
# table says so. PITHTRAIN_PYTHON names a python with torch to use instead of the venv scripts/setup.sh
# makes (the GPU machine has no registry); PITHTRAIN_KEEP_LOGS=DIR keeps the three runs' logs there.
# Usage: scripts/bench_gpu.sh [--layers N] [--steps N] [--batch N] [--peak-tflops T] [--compile-timeout S]
set -euo pipefail
layers=4; steps=8; batch=1; peak=800; compile_timeout=300
while [ $# -gt 0 ]; do
  case $1 in
    --layers) layers=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --peak-tflops) peak=$2; shift 2 ;;
    --compile-timeout) compile_timeout=$2; shift 2 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (--layers N, --steps N, --batch N, --peak-tflops T, --compile-timeout S)" >&2; exit 2 ;;
  esac
done
source "$(dirname "$0")/script_common.sh"
if [ -n "${PITHTRAIN_PYTHON:-}" ]; then
  python=$PITHTRAIN_PYTHON
else
  eval "$(bash scripts/setup.sh)"
  python=$PITHTRAIN_VENV/bin/python
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench_gpu.sh: no CUDA device here; run it on a GPU machine (docs/performance.md)" >&2
  exit 2
fi
work=$(mktemp -d)
keep_logs() {
  if [ -n "${PITHTRAIN_KEEP_LOGS:-}" ]; then
    mkdir -p "$PITHTRAIN_KEEP_LOGS"
    cp "$work/pithtrain.log" "$PITHTRAIN_KEEP_LOGS/bench_pithtrain.log" 2>/dev/null
    cp "$work/pithtrain/metrics.jsonl" "$PITHTRAIN_KEEP_LOGS/bench_metrics.jsonl" 2>/dev/null
    cp "$work/eager.txt" "$PITHTRAIN_KEEP_LOGS/bench_eager.txt" 2>/dev/null
    cp "$work/compiled.txt" "$PITHTRAIN_KEEP_LOGS/bench_compiled.txt" 2>/dev/null
  fi
  rm -rf "$work"
}
trap keep_logs EXIT
# Byte tokens of random text: the speed does not depend on the tokens.
head -c 20000000 /dev/urandom | base64 > "$work/random.txt"
"$bin" data build --format text --out "$work/tokens" "$work/random.txt" > /dev/null
"$bin" --config configs/qwen3_30b_a3b.toml --set data.path="\"$work/tokens\"" --set model.vocab_size=151936 \
  --set model.num_layers="$layers" --set train.seq_len=4096 --set train.batch_size="$batch" --set train.dtype='"bfloat16"' \
  --set train.device='"cuda"' --set train.steps="$steps" --set train.log_every=1 --set eval.every=0 --set eval.batches=0 \
  --set checkpoint.every=0 --set train.peak_tflops="$peak" --out "$work/pithtrain" > "$work/pithtrain.log" 2>&1 \
  || { tail -20 "$work/pithtrain.log"; exit 1; }
eager=(--vocab 151936 --hidden 2048 --layers "$layers" --heads 32 --kv-heads 4 --head-dim 128 --qk-norm --experts 128 --top-k 8
       --expert-hidden 768 --shared-experts 0 --first-dense 0 --router softmax --seq 4096 --batch "$batch" --steps "$steps"
       --device cuda --dtype bfloat16)
"$python" scripts/bench_eager.py "${eager[@]}" > "$work/eager.txt" || { echo "eager loop failed"; exit 1; }
compile_status=0
timeout "$compile_timeout" "$python" scripts/bench_eager.py "${eager[@]}" --compile > "$work/compiled.txt" 2>&1 || compile_status=$?
if [ "$compile_status" -ne 0 ] && [ "$compile_status" -ne 124 ]; then tail -20 "$work/compiled.txt"; echo "torch.compile loop failed"; exit 1; fi
"$python" - "$work" "$peak" <<'PY'
import json, statistics, sys
work, peak = sys.argv[1], float(sys.argv[2]) * 1e12
rows = [json.loads(line) for line in open(f"{work}/pithtrain/metrics.jsonl")]
later = [r for r in rows if r["step"] > 2]
ours = statistics.median(r["tokens_per_s"] for r in later)
# mfu = tokens/s x FLOPs per token / train.peak_tflops (set to `peak` above)
flops_per_token = statistics.median(r["mfu"] * peak / r["tokens_per_s"] for r in later)
memory = max(r.get("device_memory_peak_mb", 0) for r in rows)
print(f"{'':<16} {'tok/s':>10} {'MFU':>7} {'peak MiB':>10}")
print(f"{'pithtrain':<16} {ours:>10.0f} {100 * ours * flops_per_token / peak:>6.1f}% {memory:>10.0f}")
for name in ("eager", "compiled"):
    lines = [l.split() for l in open(f"{work}/{name}.txt")]
    lines = [l for l in lines if len(l) >= 2 and (l[0] == "peak_memory_mb" or (l[0] == "step" and l[1].isdigit() and len(l) >= 6))]
    if not any(l[0] == "step" and int(l[1]) > 2 for l in lines):
        print(f"{'torch.compile':<16} did not reach step 3 within --compile-timeout")
        continue
    speed = statistics.median(float(l[5]) / float(l[3]) for l in lines if l[0] == "step" and int(l[1]) > 2)
    peak_mb = next((float(l[1]) for l in lines if l[0] == "peak_memory_mb"), 0.0)
    label = "eager" if name == "eager" else "torch.compile"
    print(f"{label:<16} {speed:>10.0f} {100 * speed * flops_per_token / peak:>6.1f}% {peak_mb:>10.0f}")
print(f"(FLOPs per token {flops_per_token / 1e9:.2f} G, PithTrain's count; peak {peak / 1e12:.0f} TFLOP/s)")
PY
