#!/usr/bin/env bash
# ctest `fully_sharded`: schedule fully_sharded over 1, 2 and 4 Gloo processes trains exactly as one
# process (and as data_parallel) with the same global batch: loss, aux loss, gradient norms, expert
# loads, validation loss, final weights; each rank keeps 1/N of the parameters, gradients and optimizer
# state (metrics state_mb); checkpoints reshard to and from it. Args: PITHTRAIN_BIN FORTUNES_DIR
source "$(dirname "$0")/multi_process_lib.sh" "$@"
# The router is topk_softmax with the global-batch balance loss and the z-loss, so the 4-process run's
# two micro-batches also take the core's routing count pass through the gathered units.
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=3 --set eval.batches=2
        --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0 --set model.moe.router.global_aux_loss_coeff=0.01
        --set model.moe.router.z_loss_coeff=0.001 --set optimizer.eps=1e-6 --set train.global_batch_size=8)
# optimizer.eps = 1e-6: see test_expert_parallel.sh (Adam turns float32 noise in ~1e-8 gradients into lr-sized steps).
fs=(--set schedule.plugin=fully_sharded)
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
from run_outputs import metrics as load
def metrics(run): return load(f"{work}/{run}")
for run in ("fs1", "dp2", "fs2", "fs4", "fs2_to_one", "one_to_fs4"):
    # One process through the unit chain is the same arithmetic; several sum gradients in another order.
    run_outputs.assert_matches(work, run, "one", **({"weight_tolerance": 0.0} if run == "fs1" else {}))
# Fully sharded equals data parallel, and each rank keeps 1/N of the state (padding aside).
full = metrics("one")[-1]["state_mb"]
assert abs(metrics("dp2")[-1]["state_mb"] - full) <= 1e-3 * full, (metrics("dp2")[-1]["state_mb"], full)
for run, ranks in (("fs1", 1), ("fs2", 2), ("fs4", 4)):
    kept = metrics(run)[-1]["state_mb"]
    assert full / ranks <= kept <= full / ranks * 1.01, (run, kept, full)
    print(f"{run}: {kept:.2f} MiB of parameters, gradients and optimizer state per rank (one process: {full:.2f})")
PY
# Refusals, before training: bf16 master copies, expert-parallel blocks.
expect_error bf16 'train.dtype = "float32"' "${common[@]}" "${fs[@]}" --set train.steps=1 --set train.batch_size=8 \
  --set train.dtype='"bfloat16"' --out "$work/bf16"
expect_error ep "set parallel.expert = 1" launch --nproc 2 -- "${common[@]}" "${fs[@]}" --set train.steps=1 --set train.batch_size=4 \
  --set parallel.expert=2 --set model.moe.experts.plugin=ep_alltoall --out "$work/ep"
echo "fully_sharded: all checks passed"
