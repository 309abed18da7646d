#!/usr/bin/env bash
# ctest `dualpipev`: schedule dualpipev over Gloo processes (pipeline 2, pipeline 2 x data 2, pipeline 4,
# one process holding both chunks, the aux_free router) trains exactly as one process with the same
# global batch; a
# dualpipev checkpoint resumes in one process; the log names each stage's two chunks and the measured
# bubble next to the DualPipeV formula; the recorded trace of 4 stages has the published order's
# counts and dependencies and, replayed, gives the published bubble (P-1)(F&B+B-3W) exactly; too few
# micro-batches and a split of the wrong length are refused. Args: PITHTRAIN_BIN FORTUNES_DIR
source "$(dirname "$0")/multi_process_lib.sh" "$@"
# 6 layers: 8 units, one per chunk with 4 stages. train.batch_size = 1: 8 micro-batches per step (4 with
# data 2), at least 2 x parallel.pipeline as DualPipeV needs.
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=3 --set eval.batches=2
        --set model.num_layers=6 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.z_loss_coeff=0.001 --set optimizer.eps=1e-6 --set train.global_batch_size=8 --set train.batch_size=1)
topk=(--set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0.01)
# optimizer.eps = 1e-6: see test_expert_parallel.sh (Adam turns float32 noise in ~1e-8 gradients into lr-sized steps).
dv=(--set schedule.plugin=dualpipev)
run one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/one"
run dv1 "${common[@]}" "${topk[@]}" "${dv[@]}" --set train.steps=6 --out "$work/dv1"
run dv2 launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${dv[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/dv2"
run dv2dp2 launch --nproc 4 -- "${common[@]}" "${topk[@]}" "${dv[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/dv2dp2"
run dv4 launch --nproc 4 -- "${common[@]}" "${topk[@]}" "${dv[@]}" --set parallel.pipeline=4 --set schedule.trace_dir="\"$work/trace\"" \
  --set train.steps=6 --out "$work/dv4"
# The aux_free router: its bias update runs on the stage of each layer, on both chunks of a stage.
free=(--set model.moe.router.plugin=aux_free --set model.moe.router.seq_aux_loss_coeff=0.001)
run one_free "${common[@]}" "${free[@]}" --set train.steps=6 --out "$work/one_free"
run dv2_free launch --nproc 2 -- "${common[@]}" "${free[@]}" "${dv[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/dv2_free"
run dv2_to_one_first launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${dv[@]}" --set parallel.pipeline=2 --set train.steps=3 --out "$work/dv2_to_one"
run dv2_to_one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/dv2_to_one"
grep -q "resumed from .*step_000000003" "$work/dv2_to_one.log" || { echo "dv2_to_one did not resume"; exit 1; }
grep -q "pipeline: stage 0 (ranks 0-0): embedding | head; stage 1 (ranks 1-1): layer 0 | layer 5; stage 2 (ranks 2-2): layer 1 | layer 4; stage 3 (ranks 3-3): layer 2 | layer 3" "$work/dv4.log" \
  || { echo "dv4: no stage plan in the log"; cat "$work/dv4.log"; exit 1; }
grep -q "schedule dualpipev: 4 stage(s) x 2 chunks, 8 micro-batches: measured bubble .* DualPipeV theory (P-1)(F&B+B-3W) = " "$work/dv4.log" \
  || { echo "dv4: no bubble figure"; cat "$work/dv4.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
for run, base in (("dv1", "one"), ("dv2", "one"), ("dv2dp2", "one"), ("dv4", "one"), ("dv2_to_one", "one"), ("dv2_free", "one_free")):
    run_outputs.assert_matches(work, run, base)
# Each stage keeps only its two chunks' parameters and optimizer state: they add up to one process's.
full = run_outputs.metrics(f"{work}/one")[-1]["state_mb"]
kept = [run_outputs.metrics(f"{work}/dv4" + (f"/rank_{rank}" if rank else ""))[-1]["state_mb"] for rank in range(4)]
assert abs(sum(kept) - full) <= 2e-5 * full and max(kept) < full, (kept, full)
print("dv4: state per stage " + ", ".join(f"{k:.2f}" for k in kept) + f" MiB (one process: {full:.2f})")
PY
python3 "$(dirname "$0")/../scripts/pipeline_bubble.py" "$work/trace"
python3 "$(dirname "$0")/../scripts/pipeline_timeline.py" "$work/trace" > /dev/null

expect_error few 'needs at least 2 x parallel.pipeline = 4 micro-batches per step, and this run has 2' launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${dv[@]}" \
  --set parallel.pipeline=2 --set train.batch_size=4 --set train.steps=1 --out "$work/bad1"
expect_error split 'must list 4 positive counts (4 chunks (2 per stage)) adding up to the 8 units' launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${dv[@]}" \
  --set parallel.pipeline=2 --set parallel.pipeline_units='"4,4"' --set train.steps=1 --out "$work/bad2"
echo "dualpipev: all checks passed"
