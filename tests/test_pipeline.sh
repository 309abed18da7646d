#!/usr/bin/env bash
# ctest `pipeline`: schedule pipeline_1f1b over Gloo processes (pipeline 2, pipeline 2 x data 2, pipeline 4
# with an explicit split) trains exactly as one process with the same global batch: loss, aux loss,
# gradient norms, router losses, expert loads, validation loss, final weights; a pipeline checkpoint
# resumes in one process; the log names each stage's ranks and layers and the measured bubble next to
# the 1F1B figure; bad layouts are refused before training. Args: PITHTRAIN_BIN FORTUNES_DIR
source "$(dirname "$0")/multi_process_lib.sh" "$@"
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=3 --set eval.batches=2
        --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.z_loss_coeff=0.001 --set optimizer.eps=1e-6 --set train.global_batch_size=8 --set train.batch_size=2)
topk=(--set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0.01)
# optimizer.eps = 1e-6: see test_expert_parallel.sh (Adam turns float32 noise in ~1e-8 gradients into lr-sized steps).
pp=(--set schedule.plugin=pipeline_1f1b)
run one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/one"
run pp2 launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/pp2"
run pp2dp2 launch --nproc 4 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/pp2dp2"
# 5 units (embedding, 3 layers, head) over 4 stages, split by hand.
run pp4 launch --nproc 4 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=4 --set parallel.pipeline_units='"2,1,1,1"' \
  --set schedule.trace_dir="\"$work/trace\"" --set train.steps=6 --out "$work/pp4"
# The aux_free router: its bias update runs on the stage of its layer and must reach the other stages.
free=(--set model.moe.router.plugin=aux_free --set model.moe.router.seq_aux_loss_coeff=0.001)
run one_free "${common[@]}" "${free[@]}" --set train.steps=6 --out "$work/one_free"
run pp2_free launch --nproc 2 -- "${common[@]}" "${free[@]}" "${pp[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/pp2_free"
run pp2_to_one_first launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=2 --set train.steps=3 --out "$work/pp2_to_one"
run pp2_to_one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/pp2_to_one"
run one_to_pp2_first "${common[@]}" "${topk[@]}" --set train.steps=3 --out "$work/one_to_pp2"
run one_to_pp2 launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=2 --set train.steps=6 --out "$work/one_to_pp2"
grep -q "resumed from .*step_000000003" "$work/pp2_to_one.log" || { echo "pp2_to_one did not resume"; exit 1; }
grep -q "resumed from .*step_000000003" "$work/one_to_pp2.log" || { echo "one_to_pp2 did not resume"; exit 1; }
grep -q "pipeline: stage 0 (ranks 0-1): embedding + layers 0-1; stage 1 (ranks 2-3): layer 2 + head" "$work/pp2dp2.log" \
  || { echo "pp2dp2: no stage plan in the log"; cat "$work/pp2dp2.log"; exit 1; }
grep -q "pipeline: stage 0 (ranks 0-0): embedding + layer 0; stage 1 (ranks 1-1): layer 1; stage 2 (ranks 2-2): layer 2; stage 3 (ranks 3-3): head" "$work/pp4.log" \
  || { echo "pp4: no stage plan in the log"; cat "$work/pp4.log"; exit 1; }
grep -q "measured bubble .* 1F1B theory (P-1)/(M+P-1) = 42.9%" "$work/pp4.log" || { echo "pp4: no bubble figure"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
for run, base in (("pp2", "one"), ("pp2dp2", "one"), ("pp4", "one"), ("pp2_to_one", "one"), ("one_to_pp2", "one"), ("pp2_free", "one_free")):
    run_outputs.assert_matches(work, run, base)
# Each stage keeps only its parameters, gradients and optimizer state: the stages' state adds up to
# one process's.
full = run_outputs.metrics(f"{work}/one")[-1]["state_mb"]
for run, stages in (("pp2", 2), ("pp4", 4)):
    kept = [run_outputs.metrics(f"{work}/{run}" + (f"/rank_{rank}" if rank else ""))[-1]["state_mb"] for rank in range(stages)]
    # metrics.jsonl prints 6 significant digits: up to 5e-6 relative rounding per figure.
    assert abs(sum(kept) - full) <= 2e-5 * full and max(kept) < full, (run, kept, full)
    print(f"{run}: state per stage " + ", ".join(f"{k:.2f}" for k in kept) + f" MiB (one process: {full:.2f})")
PY
# The recorded trace of step 2 is the 1F1B order on every stage: P - s - 1 warm-up forwards, then one
# forward and one backward, then the remaining backwards; a backward starts after the next stage's
# backward of that micro-batch ended, a forward after the previous stage's forward.
python3 - "$work/trace" <<'PY'
import json, os, sys
stages, micro = 4, 4
events = {s: [json.loads(l) for l in open(os.path.join(sys.argv[1], f"stage_{s}.jsonl"))] for s in range(stages)}
for s in range(stages):
    order = [(e["kind"], e["micro_batch"]) for e in events[s]]
    warmup = min(stages - s - 1, micro)
    expected = [("F", m) for m in range(warmup)]
    for m in range(micro - warmup):
        expected += [("F", warmup + m), ("B", m)]
    expected += [("B", m) for m in range(micro - warmup, micro)]
    assert order == expected, (s, order, expected)
    for e in events[s]:
        neighbour = s - 1 if e["kind"] == "F" else s + 1
        if 0 <= neighbour < stages:
            before = next(x for x in events[neighbour] if x["kind"] == e["kind"] and x["micro_batch"] == e["micro_batch"])
            assert e["start"] >= before["end"] - 1e-3, (s, e, before)
print("pp4 trace: the 1F1B order on every stage, causal across stages")
PY
python3 "$(dirname "$0")/../scripts/pipeline_timeline.py" "$work/trace" > /dev/null

# Refusals before training: a schedule that runs the whole model, a split that does not add up, a
# pipeline that does not divide the processes.
expect_error single 'set schedule.plugin = "pipeline_1f1b"' launch --nproc 2 -- "${common[@]}" "${topk[@]}" --set parallel.pipeline=2 --set train.steps=1 --out "$work/bad1"
expect_error split 'must list 2 positive counts (2 stages) adding up to the 5 units' launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${pp[@]}" \
  --set parallel.pipeline=2 --set parallel.pipeline_units='"1,1"' --set train.steps=1 --out "$work/bad2"
expect_error divide 'parallel.pipeline = 3 must divide' launch --nproc 2 -- "${common[@]}" "${topk[@]}" "${pp[@]}" --set parallel.pipeline=3 --set train.steps=1 --out "$work/bad3"
echo "pipeline: all checks passed"
