#!/usr/bin/env bash
# Parity with transformers for one architecture. Args: VENV_PYTHON SOURCE_DIR TEST_PARITY_BIN ARCH
set -eu
python=$1; source_dir=$2; test_bin=$3; arch=$4
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" "$source_dir/tests/parity/make_reference.py" "$arch" "$work" 2>&1 | grep -v "Writing model shards"
"$test_bin" "$work"
