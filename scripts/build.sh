#!/usr/bin/env bash
# Installs what is missing (setup.sh) and builds everything into build/ (Ninja, Release, ccache).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh)"
build_dir=${PITHTRAIN_BUILD_DIR:-build}
if [ ! -f "$build_dir/build.ninja" ]; then
  echo "[build] configuring $build_dir" >&2
  mkdir -p "$build_dir"
  # Torch's CMake package is chatty (CUDA probing, kineto warnings); keep its output for when it fails.
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PITHTRAIN_TORCH_CMAKE" \
        -Wno-dev >"$build_dir/configure.log" 2>&1 || { cat "$build_dir/configure.log" >&2; exit 1; }
fi
echo "[build] building $build_dir (2 parallel jobs)" >&2
cmake --build "$build_dir" -j "${PITHTRAIN_JOBS:-2}" >&2
