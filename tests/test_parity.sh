#!/usr/bin/env bash
# Parity with transformers for one architecture, then the command-line path a user takes: convert
# import, and continue training from the imported weights. Args: VENV_PYTHON SOURCE_DIR TEST_PARITY_BIN
# ARCH PITHTRAIN_BIN FORTUNES_DIR
set -eu
python=$1; source_dir=$2; test_bin=$3; arch=$4; bin=$5; fortunes=$6
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" "$source_dir/tests/parity/make_reference.py" "$arch" "$work" 2>&1 | grep -v "Writing model shards"
"$test_bin" "$work"
"$bin" convert import "$work" --out "$work/imported"
"$bin" data build --format fortune --out "$work/tokens" "$fortunes/literature" >/dev/null
"$bin" --config "$work/imported/config.toml" --init-from "$work/imported/model.safetensors" --set data.path=\""$work/tokens"\" \
       --set train.steps=3 --set train.seq_len=32 --set train.batch_size=2 --set eval.batches=1 --out "$work/run" 2>&1 \
  | grep -E "initialised the weights|done:"
"$bin" convert export --config "$work/imported/config.toml" --weights "$work/run/model.safetensors" --out "$work/exported"
# transformers loads the exported, further-trained model.
"$python" -c "
import sys, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])
print('transformers loaded the export:', type(model).__name__, sum(p.numel() for p in model.parameters()), 'parameters')
" "$work/exported" 2>&1 | grep -v "Loading weights"
