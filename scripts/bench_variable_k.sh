#!/usr/bin/env bash
# Step speed of a router with a varying number of experts per token against a top-k router at the same
# mean active experts, on the CPU (the routing contract, docs/moe.md): `remoe` (its controller holds the
# mean at top_k once settled) against `topk_softmax` with the same top_k, in interleaved rounds. Reports
# each side's median tokens/s over the steps after --settle, remoe's mean active experts there, and the
# ratio remoe / topk_softmax (min / median / max over the rounds).
# --set KEY=VALUE (repeatable) applies to both runs: the settings plugins/router/remoe/README.md gives
# for the tiny config, and remoe's own keys (model.moe.router.*, which topk_softmax would refuse) only
# to the remoe run.
# Usage: scripts/bench_variable_k.sh [--rounds N] [--steps N] [--settle N] [--config FILE] [--set KEY=VALUE ...]
set -euo pipefail
rounds=2; steps=300; settle=200; config=configs/tiny.toml
common=(); remoe_only=()
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --set) case $2 in model.moe.router.*) remoe_only+=(--set "$2") ;; *) common+=(--set "$2") ;; esac; shift 2 ;;
    *) echo "bench_variable_k.sh: unknown argument $1 (--rounds N, --steps N, --settle N, --config FILE, --set KEY=VALUE)" >&2; exit 2 ;;
  esac
done
[ "$settle" -lt "$steps" ] || { echo "bench_variable_k.sh: --settle ($settle) must be below --steps ($steps)" >&2; exit 2; }
source "$(dirname "$0")/script_common.sh"
eval "$(bash scripts/setup.sh)"
python=$PITHTRAIN_VENV/bin/python
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc --all) cores (OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}), load average $(cut -d' ' -f1-3 /proc/loadavg); $config ${common[*]} ${remoe_only[*]}, $steps steps, timed after step $settle"
for round in $(seq 1 "$rounds"); do
  for router in topk_softmax remoe; do
    echo "round $round: $router" >&2
    extra=("${common[@]}"); [ "$router" = remoe ] && extra+=("${remoe_only[@]}")
    "$bin" --config "$config" --set model.moe.router.plugin=$router "${extra[@]}" --set train.steps="$steps" --set train.log_every=1 \
      --set eval.every=0 --set eval.batches=0 --set checkpoint.every=0 --set checkpoint.every_minutes=0 \
      --out "$work/$router.$round" > "$work/$router.$round.log" 2>&1 || { tail -20 "$work/$router.$round.log"; exit 1; }
  done
done
"$python" - "$work" "$rounds" "$settle" <<'PY'
import json, statistics, sys
work, rounds, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ratios = []
for r in range(1, rounds + 1):
    speed, active = {}, {}
    for router in ("topk_softmax", "remoe"):
        rows = [json.loads(line) for line in open(f"{work}/{router}.{r}/metrics.jsonl")]
        timed = [row for row in rows if row["step"] > settle]
        speed[router] = statistics.median(row["tokens_per_s"] for row in timed)
        per_step = [statistics.mean(layer["active_experts"] for layer in row["router"]) for row in timed]
        active[router] = statistics.mean(per_step)
        if router == "remoe":
            print(f"round {r}: remoe active experts per token over steps {settle + 1}-{timed[-1]['step']}: mean {active[router]:.3f}, "
                  f"min {min(per_step):.3f}, max {max(per_step):.3f}; smoothed loss at the end {rows[-1]['smoothed_loss']:.4f}")
    ratios.append(speed["remoe"] / speed["topk_softmax"])
    print(f"round {r}: topk_softmax {speed['topk_softmax']:.0f} tok/s at {active['topk_softmax']:.2f} experts/token, "
          f"remoe {speed['remoe']:.0f} tok/s at {active['remoe']:.2f} experts/token, ratio {ratios[-1]:.2f}")
print(f"remoe / topk_softmax tokens/s: min {min(ratios):.2f} / median {statistics.median(ratios):.2f} / max {max(ratios):.2f}")
PY
