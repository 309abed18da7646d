#!/usr/bin/env bash
# Packs this build for a lent GPU machine into .gpu/ (ignored by git, about 9 MiB): pithtrain, its core
# library, plugins and configs in the installed layout (bin/, lib/, lib/pithtrain/plugins/,
# share/pithtrain/configs/), the GPU test binaries
# and the shared libraries they need that are neither LibTorch's nor the C library's. The GPU machine
# has the same torch (2.11.0+cu130) and no package registry, so this build runs there against its torch;
# scripts/gpu_check.sh is the command to run there (docs/performance.md says how).
# Usage: scripts/gpu_bundle.sh   (after scripts/build.sh; PITHTRAIN_GPU_BUNDLE=DIR packs into DIR instead)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${PITHTRAIN_BUILD_DIR:-build}
bundle=${PITHTRAIN_GPU_BUNDLE:-.gpu}
tests=("$build/tests/test_kernels" "$build/plugins/experts/grouped/test_experts_grouped")
for file in "$build/bin/pithtrain" "$build/core/libpithtrain_core.so" "${tests[@]}"; do
  [ -x "$file" ] || { echo "gpu_bundle.sh: $file is missing; run scripts/build.sh first" >&2; exit 1; }
done
grep -q "PITHTRAIN_CUDA_KERNELS" "$build/build.ninja" ||
  { echo "gpu_bundle.sh: $build was configured without the CUDA kernels (no nvcc or no CUDA LibTorch)" >&2; exit 1; }
rm -rf "$bundle" && mkdir -p "$bundle/bin" "$bundle/lib/pithtrain/plugins" "$bundle/share/pithtrain/configs" "$bundle/tests"
cp "$build/bin/pithtrain" "$bundle/bin/"
cp configs/*.toml "$bundle/share/pithtrain/configs/"   # plain `pithtrain` reads share/pithtrain/configs/tiny.toml
cp "$build/core/libpithtrain_core.so" "$bundle/lib/"
cp "$build"/lib/plugins/*.so "$bundle/lib/pithtrain/plugins/"
cp "${tests[@]}" "$bundle/tests/"
# Every library a binary or plugin loads from outside LibTorch's folder and the C runtime: spdlog, fmt,
# toml++, sentencepiece, the CUDA runtime.
for file in "$bundle"/bin/* "$bundle"/lib/*.so "$bundle"/lib/pithtrain/plugins/*.so "$bundle"/tests/*; do
  ldd "$file" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -v -e '/torch/lib/' -e "$build/" -e '/libc\.so' -e '/libm\.so' -e '/libstdc++' -e '/libgcc_s' \
  -e '/libpthread' -e '/libdl\.so' -e '/librt\.so' -e '/libutil\.so' -e '/ld-linux' | while read -r library; do
  cp -L "$library" "$bundle/lib/"
done
echo "[gpu_bundle] $bundle: $(du -sh "$bundle" | cut -f1); libraries: $(cd "$bundle/lib" && ls -- *.so* | tr '\n' ' ')" >&2
