#!/usr/bin/env python3
"""Tokenizes text with a Hugging Face tokenizer.json (Qwen3, DeepSeek, GPT-OSS, ...) into PithTrain's
packed token format (docs/data.md). The offline step for tokenizers PithTrain does not implement in C++.

Run it with the project's venv, which scripts/setup.sh gives the `tokenizers` package:
  ~/.cache/pithtrain/venv-torch2.11.0/bin/python scripts/tokenize_hf.py \
      --tokenizer tokenizer.json --out data/corpus.tokens [--format auto|text|fortune|jsonl] [--eos TOKEN] INPUT...
"""
import argparse
import json
import os
import struct
import sys
import zlib

from tokenizers import Tokenizer

EOS_CANDIDATES = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<｜end▁of▁sentence｜>"]
HUGGING_FACE_TOKENIZER = 3  # the header's tokenizer id


def input_files(inputs):
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for root, _, names in os.walk(item):
                for name in names:
                    path = os.path.join(root, name)
                    if not os.path.islink(path) and not name.endswith(".dat"):
                        found.append(path)
            yield from sorted(found)
        elif os.path.isfile(item):
            yield item
        else:
            sys.exit(f"tokenize_hf: input '{item}': no such file or folder")


def documents(path, text, fmt):
    if fmt == "auto":
        fmt = "jsonl" if path.endswith(".jsonl") else "text"
    if fmt == "text":
        yield text
    elif fmt == "jsonl":
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record.get("text"), str):
                    sys.exit(f'{path}:{number}: a .jsonl line needs a string field "text"')
                yield record["text"]
    else:  # fortune: documents separated by lines holding only '%'
        document = []
        for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
            if line == "%":
                yield "".join(document)
                document = []
            else:
                document.append(line + "\n")
        yield "".join(document)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json file")
    parser.add_argument("--out", required=True, help="the token file to write")
    parser.add_argument("--format", default="auto", choices=["auto", "text", "fortune", "jsonl"])
    parser.add_argument("--eos", help="the end-of-document token (default: the first of %s the vocabulary has)" % EOS_CANDIDATES)
    parser.add_argument("inputs", nargs="+")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_file(args.tokenizer)
    candidates = [args.eos] if args.eos else EOS_CANDIDATES
    eos = next((tokenizer.token_to_id(token) for token in candidates if tokenizer.token_to_id(token) is not None), None)
    if eos is None:
        sys.exit(f"tokenize_hf: {args.tokenizer} has none of {candidates}; name its end-of-document token with --eos")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    width = 2 if vocab_size <= 65536 else 4
    tokens, count = bytearray(), 0
    pack = struct.Struct("<H" if width == 2 else "<I").pack
    for path in input_files(args.inputs):
        with open(path, "rb") as handle:
            raw = handle.read()
        if b"\0" in raw:
            continue
        batch = [d for d in documents(path, raw.decode("utf-8", errors="replace"), args.format) if d.strip()]
        for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
            for token in encoding.ids + [eos]:
                tokens += pack(token)
        count += len(batch)
    header = b"PTTOKENS" + struct.pack("<IIIIQQQ", 1, width, vocab_size, HUGGING_FACE_TOKENIZER, len(tokens) // width,
                                       count, zlib.crc32(tokens)) + bytes(16)
    assert len(header) == 64
    with open(args.out + ".tmp", "wb") as out:
        out.write(header)
        out.write(tokens)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}: {len(tokens) // width} tokens, {count} documents (tokenizer.json, vocab {vocab_size}, eos {eos})")


if __name__ == "__main__":
    main()
