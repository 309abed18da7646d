#!/usr/bin/env bash
# Memory per rank of schedule fully_sharded (ZeRO-3) against data_parallel, on CPU processes (Gloo):
# the parameters, gradients and optimizer state each rank keeps (metrics state_mb), the process's peak
# resident memory (peak_memory_mb, VmHWM: LibTorch and activations included) and tokens/s.
# Usage: scripts/bench_fully_sharded.sh [--procs "1 2 4"] [--steps N] [extra pithtrain args...]
# Default model: 8 layers, hidden 512, 8 experts of width 512 (~60 M parameters).
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a process's resident
# memory would not fall when the schedule frees a unit's tensors; a fixed threshold returns every
# freed block over 256 KiB to the system, so the peak shows what was in use. It costs speed (page
# faults on each new large tensor), so tokens/s here is not a speed figure; set
# PITHTRAIN_BENCH_GLIBC_DEFAULT=1 to measure with glibc's default instead.
set -euo pipefail
[ -n "${PITHTRAIN_BENCH_GLIBC_DEFAULT:-}" ] || export MALLOC_MMAP_THRESHOLD_=262144
procs="1 2 4"; steps=4; extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --procs) procs=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
source "$(dirname "$0")/script_common.sh"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
model=(--set model.num_layers=8 --set model.hidden_size=512 --set model.num_heads=8 --set model.num_kv_heads=8
       --set model.moe.num_experts=8 --set model.moe.expert_hidden_size=512 --set train.seq_len=64
       --set train.global_batch_size=8 --set train.batch_size=2 --set train.steps="$steps" --set train.log_every=1
       --set eval.every=0 --set eval.batches=0 --set checkpoint.every=0)
printf "%-14s %6s %16s %20s %10s\n" schedule procs "state MiB/rank" "peak RSS MiB (max)" "tok/s"
for schedule in data_parallel fully_sharded; do
  for n in $procs; do
    out="$work/${schedule}_$n"
    "$bin" launch --nproc "$n" -- --config configs/tiny.toml "${model[@]}" --set schedule.plugin="$schedule" "${extra[@]}" \
      --out "$out" > "$out.log" 2>&1 || { tail -20 "$out.log"; exit 1; }
    python3 - "$out" "$n" "$schedule" <<'PY'
import json, os, sys
out, n, schedule = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for rank in range(n):
    path = os.path.join(out, "metrics.jsonl") if rank == 0 else os.path.join(out, f"rank_{rank}", "metrics.jsonl")
    rows.append([json.loads(line) for line in open(path)][-1])
print(f"{schedule:<14} {n:>6} {rows[0]['state_mb']:>16.1f} {max(r['peak_memory_mb'] for r in rows):>20.0f} {rows[0]['tokens_per_s']:>10.0f}")
PY
  done
done
