#!/usr/bin/env bash
# The GPU bundle, checked on the CPU: scripts/gpu_bundle.sh packs a build that runs from another folder
# with only LibTorch's libraries beside it (its plugins found in the bundle), and scripts/gpu_check.sh
# runs the bundled tests there (GPU tests skipped here) and reports that the benchmark needs a GPU.
# Args: BUILD_DIR SOURCE_DIR PYTHON FORTUNES_DIR
set -euo pipefail
build=$1 source=$2 python=$3 fortunes=$4
grep -q "PITHTRAIN_CUDA_KERNELS" "$build/build.ninja" || { echo "skipped: this build has no CUDA kernels (no nvcc)"; exit 77; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
PITHTRAIN_BUILD_DIR=$build PITHTRAIN_GPU_BUNDLE=$work/bundle bash "$source/scripts/gpu_bundle.sh"
# Only the bundle and LibTorch: no path of the build tree may be needed.
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
if LD_LIBRARY_PATH=$work/bundle/lib:$torch_lib ldd "$work/bundle/bin/pithtrain" | grep -F "$build/"; then
  echo "FAIL: the bundled pithtrain loads a library from the build tree" >&2; exit 1
fi
"$work/bundle/bin/pithtrain" data build --format fortune --out "$work/fortunes.tokens" "$fortunes" > /dev/null
# Plain pithtrain in the bundle reads the bundle's configs/tiny.toml (the installed layout), not the source tree's.
LD_LIBRARY_PATH=$work/bundle/lib:$torch_lib "$work/bundle/bin/pithtrain" --help | grep -qF "$work/bundle/share/pithtrain/configs/tiny.toml" ||
  { echo "FAIL: the bundled pithtrain's default config is not the bundle's share/pithtrain/configs/tiny.toml" >&2; exit 1; }
(cd "$work" && LD_LIBRARY_PATH=$work/bundle/lib:$torch_lib "$work/bundle/bin/pithtrain" --config "$source/tests/configs/tiny.toml" \
  --set data.path="\"$work/fortunes.tokens\"" --set train.steps=2 --set eval.batches=0 --set checkpoint.every=0 \
  --out "$work/run" > "$work/run.log" 2>&1) || { cat "$work/run.log"; exit 1; }
grep -q "= grouped .*$work/bundle/lib/pithtrain/plugins/experts_grouped.so" "$work/run.log" ||
  { grep "plugin" "$work/run.log"; echo "FAIL: the bundled pithtrain did not load the bundle's plugins" >&2; exit 1; }
status=0
OUT=$work/out PITHTRAIN_GPU_BUNDLE=$work/bundle PITHTRAIN_PYTHON=$python bash "$source/scripts/gpu_check.sh" > "$work/check.log" 2>&1 || status=$?
[ "$status" -ne 0 ] || { cat "$work/check.log"; echo "FAIL: gpu_check.sh passed on a machine without a GPU" >&2; exit 1; }
for file in gpu.txt tests.txt bench.txt; do [ -s "$work/out/$file" ] || { echo "FAIL: no $file" >&2; exit 1; }; done
if grep -q "FAILED" "$work/out/tests.txt"; then cat "$work/out/tests.txt"; echo "FAIL: a bundled test failed" >&2; exit 1; fi
[ "$(grep -c "^== " "$work/out/tests.txt")" -eq 2 ] || { cat "$work/out/tests.txt"; echo "FAIL: expected 2 test binaries" >&2; exit 1; }
grep -q "PASSED" "$work/out/tests.txt" || { cat "$work/out/tests.txt"; echo "FAIL: no test passed" >&2; exit 1; }
grep -q "no CUDA device" "$work/out/bench.txt" || { cat "$work/out/bench.txt"; echo "FAIL: bench_gpu.sh did not say it needs a GPU" >&2; exit 1; }
echo "gpu bundle: $(du -sh "$work/bundle" | cut -f1), runs from another folder; gpu_check.sh ran the tests and stopped at the benchmark"
