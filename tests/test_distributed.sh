#!/usr/bin/env bash
# ctest `data_parallel`: `pithtrain launch` with 2 and 4 Gloo processes gives the loss sequence, gradient
# norms, expert loads and final weights of one process with the same global batch; a failing job exits
# non-zero naming a rank. Args: PITHTRAIN_BIN FORTUNES_DIR
set -eu
bin=$1; fortunes=$2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$bin" data build --format fortune --out "$work/tokens" "$fortunes/literature" > /dev/null
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.steps=5 --set train.log_every=1 --set checkpoint.every=0
        --set eval.every=0 --set eval.batches=1 --set model.num_layers=3 --set train.seq_len=32)
"$bin" "${common[@]}" --set train.batch_size=8 --out "$work/one" > "$work/one.log" 2>&1 || { cat "$work/one.log"; exit 1; }
"$bin" launch --nproc 2 -- "${common[@]}" --set train.batch_size=4 --out "$work/two" > "$work/two.log" 2>&1 || { cat "$work/two.log"; exit 1; }
"$bin" launch --nproc 4 -- "${common[@]}" --set train.batch_size=2 --out "$work/four" > "$work/four.log" 2>&1 || { cat "$work/four.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
def metrics(run): return run_outputs.metrics(f"{work}/{run}")
def weights(run): return run_outputs.weights(f"{work}/{run}")
reference, reference_weights = metrics("one"), weights("one")
for run in ("two", "four"):
    rows = metrics(run)
    assert len(rows) == len(reference) == 5, (run, len(rows))
    for a, b in zip(reference, rows):
        for field in ("cross_entropy", "grad_norm"):
            assert abs(a[field] - b[field]) <= 1e-5 * abs(a[field]), (run, a["step"], field, a[field], b[field])
        assert [l["tokens_per_expert"] for l in a["router"]] == [l["tokens_per_expert"] for l in b["router"]], (run, a["step"])
    other = weights(run)
    worst = max(abs(x - y) for name in reference_weights for x, y in zip(reference_weights[name], other[name]))
    assert worst < 1e-5, (run, worst)
    print(f"{run} processes vs one: 5 steps of loss, grad norm and expert load equal; final weights max |diff| {worst:.2e}")
PY
# The data_parallel schedule: buckets all-reduced while the backward runs (0.05 MiB buckets: many of
# them), with gradient accumulation, gives the same training as one process.
"$bin" launch --nproc 2 -- "${common[@]}" --set schedule.plugin=data_parallel --set schedule.bucket_mb=0.05 \
  --set train.batch_size=2 --set train.micro_batches=2 --out "$work/buckets" > "$work/buckets.log" 2>&1 || { cat "$work/buckets.log"; exit 1; }
grep -E "schedule data_parallel: [0-9]+ gradient bucket\(s\), [1-9][0-9]* started while the backward ran" "$work/buckets.log" \
  || { echo "no bucket started during the backward"; cat "$work/buckets.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import run_outputs
work = sys.argv[1]
one, buckets = run_outputs.metrics(f"{work}/one"), run_outputs.metrics(f"{work}/buckets")
for a, b in zip(one, buckets):
    for field in ("cross_entropy", "grad_norm"):
        assert abs(a[field] - b[field]) <= 1e-5 * abs(a[field]), (a["step"], field, a[field], b[field])
reference, other = run_outputs.weights(f"{work}/one"), run_outputs.weights(f"{work}/buckets")
worst = max(abs(x - y) for name in reference for x, y in zip(reference[name], other[name]))
assert worst < 1e-5, worst
print(f"schedule data_parallel (2 processes x 2 micro-batches, overlapped buckets) vs one: equal; weights max |diff| {worst:.2e}")
PY
# Two "nodes" of one process each (the multi-node path of launch: --nnodes/--node-rank/--master) train
# what one node of two processes trains.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for node in 0 1; do
  "$bin" launch --nproc 1 --nnodes 2 --node-rank $node --master 127.0.0.1:$port -- "${common[@]}" --set train.batch_size=4 \
    --out "$work/nodes" > "$work/node$node.log" 2>&1 &
done
wait %1 || { cat "$work/node0.log"; exit 1; }
wait %2 || { cat "$work/node1.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import run_outputs
two, nodes = run_outputs.metrics(f"{sys.argv[1]}/two"), run_outputs.metrics(f"{sys.argv[1]}/nodes")
assert [r["cross_entropy"] for r in two] == [r["cross_entropy"] for r in nodes], (two, nodes)
print("two nodes of one process equal one node of two processes")
PY
# The global-batch balance loss sums the expert counts over ranks: 2 processes equal one, aux loss included.
router=(--set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0.0 --set model.moe.router.global_aux_loss_coeff=0.01)
"$bin" "${common[@]}" "${router[@]}" --set train.batch_size=8 --out "$work/global_one" > "$work/g1.log" 2>&1 || { cat "$work/g1.log"; exit 1; }
"$bin" launch --nproc 2 -- "${common[@]}" "${router[@]}" --set train.batch_size=4 --out "$work/global_two" > "$work/g2.log" 2>&1 \
  || { cat "$work/g2.log"; exit 1; }
python3 - "$work" <<'PY'
import json, sys
rows = [[json.loads(line) for line in open(f"{sys.argv[1]}/{run}/metrics.jsonl")] for run in ("global_one", "global_two")]
for a, b in zip(*rows):
    for field in ("cross_entropy", "aux_loss", "grad_norm"):
        assert abs(a[field] - b[field]) <= 1e-5 * abs(a[field]), (a["step"], field, a[field], b[field])
    assert abs(a["router_losses"]["global"] - a["aux_loss"]) < 1e-6
print(f"global-batch balance loss: 2 processes equal one (aux loss {rows[0][-1]['aux_loss']:.6f} at step 5)")
PY
# Multi-token prediction (model.mtp_layers): 2 processes, with either schedule, train what one process trains,
# its loss (metrics.jsonl mtp_loss, mtp_cross_entropy) and its weights included.
mtp=(--set model.mtp_layers=1 --set model.mtp_loss_coeff=0.5)
"$bin" "${common[@]}" "${mtp[@]}" --set train.batch_size=8 --out "$work/mtp_one" > "$work/m1.log" 2>&1 || { cat "$work/m1.log"; exit 1; }
"$bin" launch --nproc 2 -- "${common[@]}" "${mtp[@]}" --set train.batch_size=4 --out "$work/mtp_two" > "$work/m2.log" 2>&1 \
  || { cat "$work/m2.log"; exit 1; }
"$bin" launch --nproc 2 -- "${common[@]}" "${mtp[@]}" --set schedule.plugin=data_parallel --set train.batch_size=2 \
  --set train.micro_batches=2 --out "$work/mtp_buckets" > "$work/m3.log" 2>&1 || { cat "$work/m3.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import run_outputs
work = sys.argv[1]
one, reference = run_outputs.metrics(f"{work}/mtp_one"), run_outputs.weights(f"{work}/mtp_one")
assert any(name.startswith("mtp_layers.0.") for name in reference), sorted(reference)[:5]
for run in ("mtp_two", "mtp_buckets"):
    rows = run_outputs.metrics(f"{work}/{run}")
    assert len(rows) == len(one) == 5, (run, len(rows))
    for a, b in zip(one, rows):
        for field in ("cross_entropy", "mtp_loss", "mtp_cross_entropy", "loss", "grad_norm"):
            assert abs(a[field] - b[field]) <= 1e-5 * abs(a[field]), (run, a["step"], field, a[field], b[field])
    other = run_outputs.weights(f"{work}/{run}")
    worst = max(abs(x - y) for name in reference for x, y in zip(reference[name], other[name]))
    assert worst < 1e-5, (run, worst)
    print(f"multi-token prediction, {run} (2 processes) vs one: loss, MTP loss, grad norm equal; weights max |diff| {worst:.2e}")
PY
if "$bin" launch --nproc 2 -- --config "$work/missing.toml" > "$work/fail.log" 2>&1; then
  echo "a failing job exited 0"; exit 1
fi
grep -q "pithtrain launch: rank [01] of 2 exited with status 1; stopping the other ranks" "$work/fail.log" || { cat "$work/fail.log"; exit 1; }
echo "a failing job exits non-zero naming the rank"
# Only rank 1 fails (its log folder cannot be made); rank 0 would wait for it in a collective: the
# launcher stops it and the job ends promptly, naming rank 1.
mkdir -p "$work/one_fails" && touch "$work/one_fails/rank_1"
start=$(date +%s)
if "$bin" launch --nproc 2 -- "${common[@]}" --set train.steps=50 --out "$work/one_fails" > "$work/one_fails.log" 2>&1; then
  echo "a job with a failing rank exited 0"; exit 1
fi
grep -q "pithtrain launch: rank 1 of 2 exited with status 1" "$work/one_fails.log" || { cat "$work/one_fails.log"; exit 1; }
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 60 ] || { echo "the job took $elapsed s to stop"; exit 1; }
echo "one failing rank stops the job in $elapsed s, naming rank 1"
