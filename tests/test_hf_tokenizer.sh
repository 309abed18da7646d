#!/usr/bin/env bash
# The Hugging Face tokenizer.json path: train a small byte-level BPE with the `tokenizers` package,
# tokenize with scripts/tokenize_hf.py, check the round trip, and train on the result.
# Args: PITHTRAIN_BIN SOURCE_DIR VENV_PYTHON FORTUNES_DIR
set -eu
bin=$1; source_dir=$2; python=$3; fortunes=$4
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$python" - "$fortunes" "$work/tokenizer.json" <<'PY'
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tokenizer.train([sys.argv[1] + "/literature", sys.argv[1] + "/riddles"], trainer)
tokenizer.save(sys.argv[2])
PY
"$python" "$source_dir/scripts/tokenize_hf.py" --tokenizer "$work/tokenizer.json" --format fortune \
  --out "$work/hf.tokens" "$fortunes/literature" "$fortunes/riddles"
# Round trip: the file's first two documents decode to the first two fortunes of the input.
"$python" - "$work/hf.tokens" "$work/tokenizer.json" "$fortunes/literature" <<'PY'
import struct, sys, zlib
from tokenizers import Tokenizer
data = open(sys.argv[1], "rb").read()
magic, (version, width, vocab, kind, count, docs, checksum) = data[:8], struct.unpack("<IIIIQQQ", data[8:48])
assert magic == b"PTTOKENS" and version == 1 and kind == 3 and width == 2, (magic, version, kind, width)
assert zlib.crc32(data[64:]) == checksum and len(data) == 64 + count * width
tokens = struct.unpack(f"<{count}H", data[64:])
tokenizer = Tokenizer.from_file(sys.argv[2])
eos = tokenizer.token_to_id("<|endoftext|>")
first = [t for t in tokens[: tokens.index(eos)]]
text = open(sys.argv[3]).read().split("\n%\n")[0] + "\n"  # fortune documents keep their last newline
assert tokenizer.decode(first) == text, (tokenizer.decode(first)[:80], text[:80])
print(f"round trip ok: {count} tokens, {docs} documents, vocab {vocab}")
PY
# The C++ reader accepts the file (header, size, CRC-32, token range) and trains on it.
"$bin" --config "$source_dir/tests/configs/tiny.toml" --set data.path=\""$work/hf.tokens"\" --set model.vocab_size=700 \
  --set train.steps=3 --set model.num_layers=2 --set train.seq_len=32 --set train.batch_size=4 --out "$work/run" 2>&1 \
  | grep -E "done:"
echo "hf tokenizer: ok"
