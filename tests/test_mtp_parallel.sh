#!/usr/bin/env bash
# ctest `mtp_parallel_refused`: multi-token prediction (model.mtp_layers) with a parallel layout it is not
# tested under is refused by name, on every rank, before training: pipeline stages (the MTP depth would sit
# with the head on the last stage but reads the embedding of the first), context and expert parallelism.
# (Data parallelism trains as one process: ctest data_parallel.) Args: PITHTRAIN_BIN FORTUNES_DIR
source "$(dirname "$0")/multi_process_lib.sh" "$@"
test_config=$(cd "$(dirname "$0")" && pwd)/configs/tiny.toml  # the tests' own config, not configs/tiny.toml
common=(--config "$test_config" --set data.path="\"$work/tokens\"" --set model.num_layers=3 --set train.seq_len=32
        --set train.steps=2 --set model.mtp_layers=1)
refused="model.mtp_layers = 1 (multi-token prediction) with"
expect_error pipeline "$refused parallel.pipeline = 2 is not supported" launch --nproc 2 -- "${common[@]}" \
  --set schedule.plugin=pipeline_1f1b --set parallel.pipeline=2 --set train.batch_size=2 --set train.global_batch_size=4 --out "$work/pp"
expect_error context "$refused parallel.context = 2 is not supported" launch --nproc 2 -- "${common[@]}" \
  --set parallel.context=2 --set model.moe.router.plugin=topk_softmax --out "$work/cp"
expect_error expert "$refused parallel.expert = 2 is not supported" launch --nproc 2 -- "${common[@]}" \
  --set parallel.expert=2 --set model.moe.experts.plugin=ep_alltoall --out "$work/ep"
for name in pipeline context expert; do [ ! -e "$work/${name:0:1}p/checkpoints" ] || { echo "$name wrote checkpoints"; exit 1; }; done
echo "multi-token prediction refused by name with pipeline, context and expert parallelism"
