#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (torch 2.11.0 on its python3, no registry):
# the CUDA kernels against their CPU references (test_kernels, test_experts_grouped), then
# scripts/bench_gpu.sh. Runs the build packed by scripts/gpu_bundle.sh in .gpu/ against that machine's
# torch. Writes gpu.txt, tests.txt and bench.txt (and each run's log) to $OUT, or to ./gpu_out.
# Exits non-zero when a test fails or the benchmark cannot run (as on a machine without a GPU).
# Usage (on the GPU machine): scripts/gpu_check.sh [bench_gpu.sh arguments]   (PITHTRAIN_GPU_BUNDLE=DIR: another bundle)
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=$(realpath -m "${PITHTRAIN_GPU_BUNDLE:-.gpu}")
out=${OUT:-gpu_out}
mkdir -p "$out"
python=${PITHTRAIN_PYTHON:-python3}
[ -x "$bundle/bin/pithtrain" ] ||
  { echo "gpu_check.sh: $bundle/bin/pithtrain is missing: run scripts/gpu_bundle.sh where it was built and bring $bundle along" >&2; exit 1; }
torch_lib=$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') ||
  { echo "gpu_check.sh: $python has no torch" >&2; exit 1; }
export LD_LIBRARY_PATH=$bundle/lib:$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  ldd "$bundle/bin/pithtrain" | grep -i "not found" && echo "gpu_check.sh: libraries missing (above); the bundle does not fit this machine"
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
status=0
{
  for test in "$bundle"/tests/*; do
    echo "== $test"
    timeout 300 "$test" --gtest_brief=1 || status=1
  done
} > "$out/tests.txt" 2>&1
tail -30 "$out/tests.txt"
PITHTRAIN_BIN=$bundle/bin/pithtrain PITHTRAIN_PYTHON=$python PITHTRAIN_KEEP_LOGS="$out" bash scripts/bench_gpu.sh "$@" \
  > "$out/bench.txt" 2>&1 || status=1
cat "$out/bench.txt"
exit $status
