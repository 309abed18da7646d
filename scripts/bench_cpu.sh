#!/usr/bin/env bash
# Training-step speed on the CPU: PithTrain against the same architecture as a plain PyTorch eager loop
# (scripts/bench_eager.py, the venv's torch: the same LibTorch build, the same thread count), in
# interleaved rounds. Reports each side's median tokens/s over the steps after the first two, and the
# ratio PithTrain / eager as min / median / max over the rounds; and memory: each side's resident memory
# before its first step and the median peak resident memory of a step (PithTrain's metrics
# step_peak_memory_mb, bench_eager.py's peak_mb; both restart the high-water mark at each step).
# --eager-fused-adamw gives the eager loop AdamW(fused=True) (PithTrain's AdamW is always fused).
# Configs: tiny (configs/tiny.toml) and mid (hidden 256, 6 layers, 16 experts top-2, expert FFN 256,
# dense FFN 768, 8 heads / 4 kv heads, sequences of 256, batch 8).
# Usage: scripts/bench_cpu.sh [--config tiny|mid|both] [--rounds N] [--steps N] [--eager-fused-adamw]
set -euo pipefail
which=both; rounds=3; steps=12; eager_common=""
while [ $# -gt 0 ]; do
  case $1 in
    --config) which=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --eager-fused-adamw) eager_common="--fused-adamw"; shift ;;
    *) echo "bench_cpu.sh: unknown argument $1 (--config tiny|mid|both, --rounds N, --steps N, --eager-fused-adamw)" >&2; exit 2 ;;
  esac
done
source "$(dirname "$0")/script_common.sh"
eval "$(bash scripts/setup.sh)"  # PITHTRAIN_VENV: the venv whose torch PithTrain links
python=$PITHTRAIN_VENV/bin/python
threads=$("$python" -c "import torch; print(torch.get_num_threads())")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, torch $("$python" -c "import torch; print(torch.__version__)"), $threads threads on both sides"

bench() {  # bench NAME "PITHTRAIN ARGS" "EAGER ARGS"
  local name=$1 ours=$2 eager=$3 round
  for round in $(seq 1 "$rounds"); do
    # shellcheck disable=SC2086
    "$bin" --config configs/tiny.toml --set train.steps="$steps" --set train.log_every=1 \
      --set eval.every=0 --set eval.batches=0 --set checkpoint.every=0 $ours --out "$work/$name.$round" > "$work/$name.$round.log" 2>&1 \
      || { tail -20 "$work/$name.$round.log"; exit 1; }
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$threads "$python" scripts/bench_eager.py --steps "$steps" --threads "$threads" $eager_common $eager > "$work/$name.$round.eager" \
      || { echo "bench_eager.py failed"; exit 1; }
  done
  "$python" - "$work" "$name" "$rounds" <<'PY'
import json, statistics, sys
work, name, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
ours, eager, ratios, memory = [], [], [], {"ours_start": [], "ours_step": [], "eager_start": [], "eager_step": []}
for r in range(1, rounds + 1):
    rows = [json.loads(line) for line in open(f"{work}/{name}.{r}/metrics.jsonl")]
    a = statistics.median(row["tokens_per_s"] for row in rows if row["step"] > 2)
    steps = [line.split() for line in open(f"{work}/{name}.{r}.eager") if line.startswith("step ")]
    b = statistics.median(float(s[5]) / float(s[3]) for s in steps if int(s[1]) > 2)
    ours.append(a), eager.append(b), ratios.append(a / b)
    print(f"{name} round {r}: pithtrain {a:.0f} tok/s, eager {b:.0f} tok/s, ratio {a / b:.2f}")
    before = [float(line.split("before the first step: ")[1].split()[0]) for line in open(f"{work}/{name}.{r}.log")
              if "before the first step: " in line]
    if before and all("step_peak_memory_mb" in row for row in rows) and all(len(s) >= 12 for s in steps):
        memory["ours_start"].append(before[0])
        memory["ours_step"].append(statistics.median(row["step_peak_memory_mb"] for row in rows if row["step"] > 2))
        memory["eager_start"].append(float(steps[0][9]))
        memory["eager_step"].append(statistics.median(float(s[11]) for s in steps if int(s[1]) > 2))
print(f"{name}: pithtrain median {statistics.median(ours):.0f} tok/s, eager median {statistics.median(eager):.0f} tok/s; "
      f"ratio min {min(ratios):.2f} / median {statistics.median(ratios):.2f} / max {max(ratios):.2f}")
if memory["ours_step"]:
    m = {key: statistics.median(values) for key, values in memory.items()}
    print(f"{name} resident memory (MiB, medians): pithtrain {m['ours_start']:.0f} before the first step, {m['ours_step']:.0f} "
          f"at a step's peak; eager {m['eager_start']:.0f} before the first step, {m['eager_step']:.0f} at a step's peak")
else:
    print(f"{name}: no memory figures (this kernel does not let /proc/self/clear_refs restart the high-water mark)")
PY
}
if [ "$which" = tiny ] || [ "$which" = both ]; then
  bench tiny "" ""
fi
if [ "$which" = mid ] || [ "$which" = both ]; then
  bench mid "--set model.hidden_size=256 --set model.num_layers=6 --set model.num_heads=8 --set model.num_kv_heads=4 --set model.dense_hidden_size=768 --set model.moe.num_experts=16 --set model.moe.expert_hidden_size=256 --set train.seq_len=256 --set train.batch_size=8" \
    "--hidden 256 --layers 6 --heads 8 --kv-heads 4 --dense-hidden 768 --experts 16 --expert-hidden 256 --seq 256 --batch 8"
fi
