#!/usr/bin/env bash
# ctest `context_parallel`: parallel.context splits every sequence over ranks (ring attention in gqa,
# the load-balanced causal split) and trains exactly as one process with the same global batch; so do
# 2 x 2 with data, 2 x 2 with pipeline, the 4-D mesh pipeline 2 x data 2 x context 2 x expert 2 on 8
# processes, and the aux_free router; a context-parallel checkpoint resumes in one process; bad
# layouts are refused before training. Args: PITHTRAIN_BIN FORTUNES_DIR
source "$(dirname "$0")/multi_process_lib.sh" "$@"
# Every router loss that depends on the split: the micro-batch (switch) and sequence-wise balance losses
# count the context group's tokens, the z-loss is a mean over tokens.
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set train.log_every=1 --set eval.every=3 --set eval.batches=2
        --set model.num_layers=3 --set train.seq_len=32 --set train.lr_schedule=constant --set train.warmup_steps=2
        --set model.moe.router.z_loss_coeff=0.001 --set model.moe.router.seq_aux_loss_coeff=0.01
        --set optimizer.eps=1e-6 --set train.global_batch_size=8 --set train.batch_size=2)
# optimizer.eps = 1e-6: see test_expert_parallel.sh (Adam turns float32 noise in ~1e-8 gradients into lr-sized steps).
topk=(--set model.moe.router.plugin=topk_softmax --set model.moe.router.aux_loss_coeff=0.01)
free=(--set model.moe.router.plugin=aux_free)
run one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/one"
run cp2 launch --nproc 2 -- "${common[@]}" "${topk[@]}" --set parallel.context=2 --set train.steps=6 --out "$work/cp2"
run cp4 launch --nproc 4 -- "${common[@]}" "${topk[@]}" --set parallel.context=4 --set train.steps=6 --out "$work/cp4"
run dp2cp2 launch --nproc 4 -- "${common[@]}" "${topk[@]}" --set parallel.context=2 --set train.steps=6 --out "$work/dp2cp2"
run pp2cp2 launch --nproc 4 -- "${common[@]}" "${topk[@]}" --set parallel.context=2 --set parallel.pipeline=2 \
  --set schedule.plugin=pipeline_1f1b --set train.steps=6 --out "$work/pp2cp2"
run mesh8 launch --nproc 8 -- "${common[@]}" "${topk[@]}" --set parallel.pipeline=2 --set parallel.context=2 --set parallel.expert=2 \
  --set model.moe.experts.plugin=ep_alltoall --set schedule.plugin=pipeline_1f1b --set train.steps=6 --out "$work/mesh8"
run one_free "${common[@]}" "${free[@]}" --set train.steps=6 --out "$work/one_free"
run cp2_free launch --nproc 2 -- "${common[@]}" "${free[@]}" --set parallel.context=2 --set train.steps=6 --out "$work/cp2_free"
run cp2_to_one_first launch --nproc 2 -- "${common[@]}" "${topk[@]}" --set parallel.context=2 --set train.steps=3 --out "$work/cp2_to_one"
run cp2_to_one "${common[@]}" "${topk[@]}" --set train.steps=6 --out "$work/cp2_to_one"
grep -q "resumed from .*step_000000003" "$work/cp2_to_one.log" || { echo "cp2_to_one did not resume"; exit 1; }
grep -q "pipeline: stage 0 (ranks 0-3): embedding + layers 0-1; stage 1 (ranks 4-7): layer 2 + head" "$work/mesh8.log" \
  || { echo "mesh8: no stage plan in the log"; cat "$work/mesh8.log"; exit 1; }
python3 - "$work" "$(dirname "$0")" <<'PY'
import sys
work = sys.argv[1]
sys.path.insert(0, sys.argv[2])
import run_outputs
for run, base in (("cp2", "one"), ("cp4", "one"), ("dp2cp2", "one"), ("pp2cp2", "one"), ("mesh8", "one"),
                  ("cp2_free", "one_free"), ("cp2_to_one", "one")):
    run_outputs.assert_matches(work, run, base)
PY
expect_error seq 'train.seq_len = 30 must be a multiple of 2 x parallel.context = 4' launch --nproc 2 -- "${common[@]}" "${topk[@]}" \
  --set parallel.context=2 --set train.seq_len=30 --set train.steps=1 --out "$work/bad1"
expect_error mla "attention plugin 'mla' does not split sequences over ranks" launch --nproc 2 -- "${common[@]}" "${topk[@]}" \
  --set parallel.context=2 --set model.attention.plugin=mla --set train.steps=1 --out "$work/bad2"
expect_error hybrid "attention plugin 'gated_deltanet' does not split sequences over ranks (model.linear_attention.plugin" \
  launch --nproc 2 -- "${common[@]}" "${topk[@]}" --set parallel.context=2 --set model.full_attention_interval=3 \
  --set model.linear_attention.plugin=gated_deltanet --set train.steps=1 --out "$work/bad_hybrid"
expect_error divide 'parallel.context = 3 must divide' launch --nproc 2 -- "${common[@]}" "${topk[@]}" --set parallel.context=3 \
  --set train.steps=1 --out "$work/bad3"
echo "context_parallel: all checks passed"
