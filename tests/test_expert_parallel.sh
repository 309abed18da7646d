#!/usr/bin/env bash
# ctest `expert_parallel`: ep_alltoall over 2 and 4 Gloo processes (and 2 x 2 data x expert) trains exactly
# as one process with the same global batch (loss, aux loss, gradient norms of the experts and the
# router, expert loads, final weights); checkpoints reshard between layouts; bad meshes are refused
# before any process group exists. Args: PITHTRAIN_BIN FORTUNES_DIR
set -eu
bin=$1; fortunes=$2
work=${KEEP_WORK:-$(mktemp -d)}; [ -n "${KEEP_WORK:-}" ] || trap 'rm -rf "$work"' EXIT; mkdir -p "$work"
"$bin" data build --format fortune --out "$work/tokens" "$fortunes/literature" > /dev/null
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=0 --set eval.batches=1
        --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0 --set model.moe.router.global_aux_loss_coeff=0.01
        --set model.moe.router.z_loss_coeff=0.001 --set optimizer.eps=1e-6)
# optimizer.eps = 1e-6: with the default 1e-8, Adam's first updates are lr * sign(g) for gradients near
# 1e-8, so float32 summation-order noise in such tiny gradients moves a weight by up to lr; measured:
# 1.9e-5 after one step for plain data parallel over 4 processes, 7e-7 after 6 steps with 1e-6.
ep=(--set model.moe.experts.plugin=ep_alltoall)
run() {  # run NAME [launch args --] pithtrain args...
  local name=$1; shift
  "$bin" "$@" > "$work/$name.log" 2>&1 || { echo "run $name failed:"; cat "$work/$name.log"; exit 1; }
}
run one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/one"
run ep2 launch --nproc 2 -- "${common[@]}" "${ep[@]}" --set parallel.expert=2 --set train.steps=6 --set train.batch_size=4 --out "$work/ep2"
run ep4 launch --nproc 4 -- "${common[@]}" "${ep[@]}" --set parallel.expert=4 --set train.steps=6 --set train.batch_size=2 --out "$work/ep4"
run dp2ep2 launch --nproc 4 -- "${common[@]}" "${ep[@]}" --set parallel.expert=2 --set train.steps=6 --set train.batch_size=2 --out "$work/dp2ep2"
run dp2ep2_buckets launch --nproc 4 -- "${common[@]}" "${ep[@]}" --set parallel.expert=2 --set train.steps=6 --set train.batch_size=2 \
  --set schedule.plugin=data_parallel --set schedule.bucket_mb=0.05 --out "$work/dp2ep2_buckets"
# Resharding: 3 steps saved by one layout, continued to 6 by another (global batch 8 throughout).
for saved in dp2 ep2; do
  extra=(); [ $saved = ep2 ] && extra=("${ep[@]}" --set parallel.expert=2)
  run first_$saved launch --nproc 2 -- "${common[@]}" "${extra[@]}" --set train.steps=3 --set train.batch_size=4 --out "$work/first_$saved"
done
cp -r "$work/first_dp2" "$work/dp2_to_one"; run dp2_to_one "${common[@]}" --set train.steps=6 --set train.batch_size=4 --set train.global_batch_size=8 --out "$work/dp2_to_one"
cp -r "$work/first_dp2" "$work/dp2_to_ep2"
run dp2_to_ep2 launch --nproc 2 -- "${common[@]}" "${ep[@]}" --set parallel.expert=2 --set train.steps=6 --set train.batch_size=4 --out "$work/dp2_to_ep2"
cp -r "$work/first_ep2" "$work/ep2_to_one"; run ep2_to_one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/ep2_to_one"
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
for run in ("ep2", "ep4", "dp2ep2", "dp2ep2_buckets", "dp2_to_one", "dp2_to_ep2", "ep2_to_one"):
    rows = metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], (run, [r["step"] for r in rows])
    for a, b in zip(reference, rows):
        for field in ("cross_entropy", "aux_loss", "grad_norm"):
            assert close(a[field], b[field]), (run, a["step"], field, a[field], b[field])
        for group in ("experts", "router", "attention"):
            assert close(a["grad_norms"][group], b["grad_norms"][group]), (run, a["step"], group, a["grad_norms"][group], b["grad_norms"][group])
        for name in a["router_losses"]:
            assert close(a["router_losses"][name], b["router_losses"][name]), (run, a["step"], name)
        assert [l["tokens_per_expert"] for l in a["router"]] == [l["tokens_per_expert"] for l in b["router"]], (run, a["step"])
    other = weights(run)
    assert sorted(other) == sorted(reference_weights), run
    worst = max(abs(x - y) for name in reference_weights for x, y in zip(reference_weights[name], other[name]))
    assert worst < 2e-6, (run, worst)
    print(f"{run:>14} vs one process: 6 steps of loss, aux loss, expert/router gradient norms and loads equal; "
          f"final weights max |diff| {worst:.2e}")
PY
# Bad meshes fail on every rank before any process group exists, naming the numbers and the keys.
expect_error() {  # expect_error MESSAGE launch-args...
  local message=$1; shift
  if "$bin" "$@" > "$work/error.log" 2>&1; then echo "accepted: $*"; exit 1; fi
  grep -qF "$message" "$work/error.log" || { echo "expected '$message' in:"; cat "$work/error.log"; exit 1; }
}
expect_error "parallel.expert = 3 must divide parallel.data = 2" launch --nproc 2 -- "${common[@]}" "${ep[@]}" --set parallel.expert=3
expect_error "parallel.data = 4 but the job has 2 process(es)" launch --nproc 2 -- "${common[@]}" --set parallel.data=4
expect_error "model.moe.num_experts = 6 is not divisible by parallel.expert = 4" \
  launch --nproc 4 -- "${common[@]}" "${ep[@]}" --set parallel.expert=4 --set model.moe.num_experts=6
expect_error "train.global_batch_size = 10 is not a multiple of train.batch_size x parallel.data = 4 x 2 = 8" \
  launch --nproc 2 -- "${common[@]}" --set train.batch_size=4 --set train.global_batch_size=10
expect_error "the experts plugin 'grouped' keeps every expert on every rank" launch --nproc 2 -- "${common[@]}" --set parallel.expert=2
# Several processes on one named GPU: refused before NCCL is asked for a group.
expect_error 'train.device = "cuda:0" with 2 processes; set train.device = "cuda"' launch --nproc 2 -- "${common[@]}" --set train.device=cuda:0
echo "bad meshes are refused with the numbers and keys named"
