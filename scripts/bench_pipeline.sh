#!/usr/bin/env bash
# Tokens/s and bubble of the pipeline schedules (pipeline_1f1b, dualpipev) on CPU processes (Gloo),
# against one process with the same global batch: the tiny config with 6 layers (8 units: one per
# dualpipev chunk at 4 stages) at 2 and 4 stages with 4 and 8 micro-batches. The bubble is the
# schedule's own measure (share of the step a stage does not compute, mean over stages, mean over the
# steps after the first), next to its theory: 1F1B (P - 1) / (M + P - 1); DualPipeV (P - 1)(F&B + B - 3W)
# with the step's measured durations, as a share of the step.
# Usage: scripts/bench_pipeline.sh [--steps N] [extra pithtrain args...]
set -euo pipefail
steps=20; extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --steps) steps=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
source "$(dirname "$0")/script_common.sh"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
common=(--config configs/tiny.toml --set train.steps="$steps" --set train.log_every=1 --set eval.every=0 --set eval.batches=0
        --set checkpoint.every=0 --set train.batch_size=4 --set model.num_layers=6)
printf "%-14s %6s %13s %10s %18s %14s\n" schedule stages micro-batches "tok/s" "bubble measured" "theory"
run() {  # run NAME PROCESSES STAGES MICRO_BATCHES [SCHEDULE]
  local name=$1 processes=$2 stages=$3 micro=$4 schedule=${5:-pipeline_1f1b}
  [ "$stages" = 1 ] && schedule=single
  local args=("${common[@]}" --set train.global_batch_size=$((4 * micro)) --set schedule.plugin=$schedule --out "$work/$name" "${extra[@]}")
  [ "$stages" -gt 1 ] && args+=(--set parallel.pipeline="$stages" --set schedule.bubble_every=1)
  if [ "$processes" = 1 ]; then "$bin" "${args[@]}" > "$work/$name.log" 2>&1 || { tail -20 "$work/$name.log"; exit 1; }
  else "$bin" launch --nproc "$processes" -- "${args[@]}" > "$work/$name.log" 2>&1 || { tail -20 "$work/$name.log"; exit 1; }; fi
  python3 - "$work/$name" "$work/$name.log" "$schedule" "$stages" "$micro" <<'PY'
import json, re, statistics, sys
out, log, schedule, stages, micro = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")][1:]
speed = statistics.median(r["tokens_per_s"] for r in rows)
bubbles = [float(m) for m in re.findall(r"measured bubble ([0-9.]+)%", open(log).read())][1:]
measured = f"{statistics.mean(bubbles):.1f}%" if bubbles else "-"
text = open(log).read()
if schedule == "dualpipev":
    shares = [float(m) for m in re.findall(r"DualPipeV theory \(P-1\)\(F&B\+B-3W\) = [0-9.]+ ms = ([0-9.]+)%", text)][1:]
    theory = f"{statistics.mean(shares):.1f}%" if shares else "-"
else:
    theory = f"{100 * (stages - 1) / (micro + stages - 1):.1f}%" if stages > 1 else "-"
print(f"{schedule:<14} {stages:>6} {micro:>13} {speed:>10.0f} {measured:>18} {theory:>14}")
PY
}
run one_m4 1 1 4
run pp2_m4 2 2 4
run pp2_m8 2 2 8
run pp4_m8 4 4 8
run dv2_m4 2 2 4 dualpipev
run dv2_m8 2 2 8 dualpipev
run dv4_m8 4 4 8 dualpipev
