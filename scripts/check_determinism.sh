#!/usr/bin/env bash
# Runs the same training twice with train.deterministic = true and compares the per-step losses and the
# final weights byte for byte (docs/moe.md). On a GPU this is the determinism check of issue-level
# claims; on the CPU ctest Determinism.* covers it already.
# Usage: scripts/check_determinism.sh [--device cuda:0] [--config F] [--steps N] [extra pithtrain args...]
set -euo pipefail
device=cpu; config=configs/tiny.toml; steps=20; extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
source "$(dirname "$0")/script_common.sh"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for run in a b; do
  echo "run $run: $steps steps of $config on $device"
  "$bin" --config "$config" --set train.deterministic=true --set train.device="\"$device\"" --set train.steps="$steps" \
         --set train.log_every=1 --set checkpoint.every=0 --set eval.every=0 "${extra[@]}" --out "$work/$run" > "$work/$run.log" 2>&1 \
    || { tail -20 "$work/$run.log"; exit 1; }
done
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
losses = [[json.loads(l)["cross_entropy"] for l in open(f"{work}/{run}/metrics.jsonl")] for run in "ab"]
differing = [i + 1 for i, (x, y) in enumerate(zip(*losses)) if x != y]
print(f"losses: {len(losses[0])} steps, {'identical' if not differing else f'differ at steps {differing[:5]}'}")
sys.exit(1 if differing or len(losses[0]) != len(losses[1]) else 0)
PY
if cmp -s "$work/a/model.safetensors" "$work/b/model.safetensors"; then
  echo "weights: bit-identical ($(stat -c %s "$work/a/model.safetensors") bytes)"
else
  echo "weights: DIFFER"; exit 1
fi
