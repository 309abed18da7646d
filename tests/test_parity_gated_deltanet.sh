#!/usr/bin/env bash
# Parity of the attention plugin gated_deltanet with transformers' Qwen3NextGatedDeltaNet (float32): the
# reference comes from tests/parity/gated_deltanet_reference.py, the comparison is the plugin test's
# MatchesTransformersQwen3NextGatedDeltaNet. Args: VENV_PYTHON SOURCE_DIR TEST_BIN
set -eu
python=$1; source_dir=$2; test_bin=$3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" "$source_dir/tests/parity/gated_deltanet_reference.py" "$work/reference.txt" 2>&1 | grep -v "falling back to its reference"
PITHTRAIN_GATED_DELTANET_REFERENCE="$work/reference.txt" "$test_bin" --gtest_filter='*MatchesTransformers*' \
  | tee "$work/log"
grep -q "^\[  PASSED  \] 1 test" "$work/log"  # run, not skipped
