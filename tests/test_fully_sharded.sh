#!/usr/bin/env bash
# ctest `fully_sharded`: schedule fully_sharded over 1, 2 and 4 Gloo processes trains exactly as one
# process (and as data_parallel) with the same global batch: loss, aux loss, gradient norms, expert
# loads, validation loss, final weights; each rank keeps 1/N of the parameters, gradients and optimizer
# state (metrics state_mb); checkpoints reshard to and from it. Args: PITHTRAIN_BIN FORTUNES_DIR
set -eu
bin=$1; fortunes=$2
work=${KEEP_WORK:-$(mktemp -d)}; [ -n "${KEEP_WORK:-}" ] || trap 'rm -rf "$work"' EXIT; mkdir -p "$work"
"$bin" data build --format fortune --out "$work/tokens" "$fortunes/literature" > /dev/null
# The router is topk_softmax with the global-batch balance loss and the z-loss, so the 4-process run's
# two micro-batches also take the core's routing count pass through the gathered units.
common=(--set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=3 --set eval.batches=2
        --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0 --set model.moe.router.global_aux_loss_coeff=0.01
        --set model.moe.router.z_loss_coeff=0.001 --set optimizer.eps=1e-6 --set train.global_batch_size=8)
# optimizer.eps = 1e-6: see test_expert_parallel.sh (Adam turns float32 noise in ~1e-8 gradients into lr-sized steps).
fs=(--set schedule.plugin=fully_sharded)
run() {  # run NAME [launch args --] pithtrain args...
  local name=$1; shift
  "$bin" "$@" > "$work/$name.log" 2>&1 || { echo "run $name failed:"; cat "$work/$name.log"; exit 1; }
}
run one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/one"
run fs1 "${common[@]}" "${fs[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/fs1"
run dp2 launch --nproc 2 -- "${common[@]}" --set schedule.plugin=data_parallel --set train.steps=6 --set train.batch_size=4 --out "$work/dp2"
run fs2 launch --nproc 2 -- "${common[@]}" "${fs[@]}" --set train.steps=6 --set train.batch_size=4 --out "$work/fs2"
run fs4 launch --nproc 4 -- "${common[@]}" "${fs[@]}" --set train.steps=6 --set train.batch_size=1 --out "$work/fs4"
# Resharding: 3 steps under one layout, continued to 6 under another.
run first_fs2 launch --nproc 2 -- "${common[@]}" "${fs[@]}" --set train.steps=3 --set train.batch_size=4 --out "$work/fs2_to_one"
run fs2_to_one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/fs2_to_one"
run first_one "${common[@]}" --set train.steps=3 --set train.batch_size=8 --out "$work/one_to_fs4"
run one_to_fs4 launch --nproc 4 -- "${common[@]}" "${fs[@]}" --set train.steps=6 --set train.batch_size=2 --out "$work/one_to_fs4"
grep -q "resumed from .*step_000000003" "$work/fs2_to_one.log" || { echo "fs2_to_one did not resume"; exit 1; }
grep -q "resumed from .*step_000000003" "$work/one_to_fs4.log" || { echo "one_to_fs4 did not resume"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
def metrics(run): return run_outputs.metrics(f"{work}/{run}")
def weights(run): return run_outputs.weights(f"{work}/{run}")
def close(a, b, tolerance=1e-5):
    return abs(a - b) <= tolerance * max(abs(a), 1e-3)
reference, reference_weights = metrics("one"), weights("one")
assert all(row["aux_loss"] > 0 for row in reference), "the comparison needs a router loss"
for run in ("fs1", "dp2", "fs2", "fs4", "fs2_to_one", "one_to_fs4"):
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], (run, [r["step"] for r in rows])
    for a, b in zip(reference, rows):
        for field in ("cross_entropy", "aux_loss", "grad_norm") + (("val_loss",) if "val_loss" in a else ()):
            assert close(a[field], b[field]), (run, a["step"], field, a[field], b[field])
        for group in a["grad_norms"]:
            assert close(a["grad_norms"][group], b["grad_norms"][group]), (run, a["step"], group)
        for name in a["router_losses"]:
            assert close(a["router_losses"][name], b["router_losses"][name]), (run, a["step"], name)
        assert [l["tokens_per_expert"] for l in a["router"]] == [l["tokens_per_expert"] for l in b["router"]], (run, a["step"])
    other = weights(run)
    assert sorted(other) == sorted(reference_weights), run
    worst = max(max(abs(x - y) for x, y in zip(reference_weights[k], other[k])) for k in reference_weights)
    # One process through the unit chain is the same arithmetic; several sum gradients in another order.
    assert worst <= (0.0 if run == "fs1" else 2e-6), (run, worst)
    print(f"{run}: 6 steps equal to one process; final weights max |diff| {worst:.2g}")
# Fully sharded equals data parallel, and each rank keeps 1/N of the state (padding aside).
full = reference[-1]["state_mb"]
assert abs(metrics("dp2")[-1]["state_mb"] - full) <= 1e-3 * full, (metrics("dp2")[-1]["state_mb"], full)
for run, ranks in (("fs1", 1), ("fs2", 2), ("fs4", 4)):
    kept = metrics(run)[-1]["state_mb"]
    assert full / ranks <= kept <= full / ranks * 1.01, (run, kept, full)
    print(f"{run}: {kept:.2f} MiB of parameters, gradients and optimizer state per rank (one process: {full:.2f})")
PY
# Refusals, before training: bf16 master copies, expert-parallel blocks.
if "$bin" "${common[@]}" "${fs[@]}" --set train.steps=1 --set train.batch_size=8 --set train.dtype='"bfloat16"' --out "$work/bf16" > "$work/bf16.log" 2>&1; then
  echo "bf16 with fully_sharded was accepted"; exit 1; fi
grep -q "train.dtype = \"float32\"" "$work/bf16.log" || { cat "$work/bf16.log"; exit 1; }
if "$bin" launch --nproc 2 -- "${common[@]}" "${fs[@]}" --set train.steps=1 --set train.batch_size=4 --set parallel.expert=2 \
    --set model.moe.experts.plugin=ep_alltoall --out "$work/ep" > "$work/ep.log" 2>&1; then
  echo "fully_sharded with expert parallelism was accepted"; exit 1; fi
grep -q "set parallel.expert = 1" "$work/ep.log" || { cat "$work/ep.log"; exit 1; }
echo "fully_sharded: all checks passed"
