#!/usr/bin/env bash
# ctest `muon_layouts`: muon under expert parallelism (2 Gloo processes, each orthogonalising its own
# experts) trains exactly as one process with the same global batch, and its checkpoint (the experts'
# momentum in blocks) resumes in one process; fully_sharded is refused by name. Args: PITHTRAIN_BIN FORTUNES_DIR
tests=$(cd "$(dirname "$0")/../../../tests" && pwd)
source "$tests/multi_process_lib.sh" "$@"
# ns_dtype = float32: the processes sum gradients in another order, and bfloat16 would turn that float32
# noise into bfloat16 roundings of the iteration's input. adamw_eps = 1e-6 for the AdamW part, as in
# tests/test_expert_parallel.sh (Adam turns noise in ~1e-8 gradients into lr-sized steps).
common=(--config "$tests/configs/tiny.toml" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=0
        --set eval.batches=1 --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant
        --set train.warmup_steps=2 --set optimizer.plugin=muon --set optimizer.ns_dtype=float32 --set optimizer.adamw_eps=1e-6)
ep=(--set model.moe.experts.plugin=ep_alltoall --set parallel.expert=2)
run one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/one"
run ep2 launch --nproc 2 -- "${common[@]}" "${ep[@]}" --set train.steps=6 --set train.batch_size=4 --out "$work/ep2"
run first_ep2 launch --nproc 2 -- "${common[@]}" "${ep[@]}" --set train.steps=3 --set train.batch_size=4 --out "$work/ep2_to_one"
run ep2_to_one "${common[@]}" --set train.steps=6 --set train.batch_size=8 --out "$work/ep2_to_one"
grep -q "resumed from .*step_000000003" "$work/ep2_to_one.log" || { echo "ep2_to_one did not resume"; exit 1; }
grep -q "optimizer muon: Muon updates" "$work/one.log" || { echo "muon's start-up line missing:"; cat "$work/one.log"; exit 1; }
python3 - "$work" "$tests" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
for run in ("ep2", "ep2_to_one"):
    run_outputs.assert_matches(work, run, "one")
PY
expect_error fully_sharded 'schedule.plugin = "fully_sharded" hands the optimizer flat shards' \
  "${common[@]}" --set schedule.plugin=fully_sharded --set train.steps=1 --set train.batch_size=8 --out "$work/fully_sharded"
echo "fully_sharded is refused by name"
