#!/usr/bin/env bash
# Builds docs/examples/router_sigmoid_topk against this build's SDK, exactly as docs/plugins.md says,
# then checks it and trains two steps with it. Args: PITHTRAIN_BIN BUILD_DIR SOURCE_DIR TORCH_DIR FORTUNES
set -eu
bin=$1; build_dir=$2; source_dir=$3; torch_dir=$4; fortunes=$5
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
start=$(date +%s)
cmake -S "$source_dir/docs/examples/router_sigmoid_topk" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DPithTrain_DIR="$build_dir" -DTorch_DIR="$torch_dir" -Wno-dev >"$work/configure.log" 2>&1 || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
echo "configured and built in $(( $(date +%s) - start )) s"
plugin="$work/build/router_sigmoid_topk.so"
"$bin" plugin check "$plugin"
"$bin" data build --format fortune --out "$work/tokens" "$fortunes" >/dev/null
"$bin" --config "$source_dir/tests/configs/tiny.toml" --plugins "$plugin" --set model.moe.router.plugin=sigmoid_topk \
       --set data.path=\""$work/tokens"\" --set train.steps=2 --set model.num_layers=2 --set train.seq_len=32 \
       --out "$work/run" 2>&1 | grep -E "router.plugin|done:"
grep -q "sigmoid_topk" "$work/run/config.toml"
echo "out-of-tree plugin: ok"
