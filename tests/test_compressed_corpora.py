#!/usr/bin/env python3
"""ctest `compressed_corpora`: `pithtrain data build` on corpora as they ship. .gz and .zst files (several
gzip members and zstd frames too) give byte-identical token files to the plain ones, and the tokens equal
a reference computed here from the text (documents split across the reader's 1 MiB chunks included); a
damaged or truncated .gz/.zst is refused naming the file, leaving no output; Parquet goes through
scripts/parquet_to_jsonl.py (pyarrow) and gives the tokens of the same texts as plain JSONL.

Args: PITHTRAIN_BIN SOURCE_DIR FORTUNES_DIR (run by the venv's python, which has pyarrow)."""
import gzip
import json
import random
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

binary, source, fortunes = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
        print("FAIL:", message)


def build(out, *inputs, fmt="auto", expect_ok=True):
    result = subprocess.run([binary, "data", "build", "--format", fmt, "--out", str(out), *map(str, inputs)],
                            capture_output=True, text=True)
    if expect_ok and result.returncode != 0:
        sys.exit(f"FAIL: data build {inputs} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def zstd_compress(data, path):
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write(data)


def tokens_of(path):
    """The tokens of a token file, its header checked against the format (docs/data.md)."""
    data = Path(path).read_bytes()
    magic, version, width, vocab, tokenizer, count, documents, checksum = struct.unpack("<8sIIIIQQQ", data[:48])
    check(magic == b"PTTOKENS" and width == 2 and vocab == 257 and len(data) == 64 + 2 * count, f"{path}: bad header")
    check(zlib.crc32(data[64:]) == checksum, f"{path}: checksum is not zlib's crc32 of the tokens")
    return list(struct.unpack(f"<{count}H", data[64:])), documents


def reference_tokens(documents):
    """Byte tokens of the non-blank documents, 256 after each."""
    tokens, count = [], 0
    for document in documents:
        if document.strip(b" \t\r\n"):
            tokens += list(document) + [256]
            count += 1
    return tokens, count


def fortune_documents(text):
    documents, current = [], b""
    for line in text.split(b"\n")[:-1] if text.endswith(b"\n") else text.split(b"\n"):
        if line == b"%":
            documents.append(current)
            current = b""
        else:
            current += line + b"\n"
    return documents + [current]


with tempfile.TemporaryDirectory() as scratch:
    work = Path(scratch)
    random.seed(7)
    # Fortune text over 3 MiB (documents cross the 1 MiB chunks), with a blank document that is dropped.
    fortune_text = b"".join(f.read_bytes() for f in sorted(fortunes.iterdir()) if f.is_file() and not f.is_symlink()
                            and f.suffix != ".dat" and b"\0" not in f.read_bytes())
    fortune_text = (fortune_text + b"%\n   \n%\n") * 2
    plain = work / "f.txt"
    plain.write_bytes(fortune_text)
    check(len(fortune_text) > 3 << 20, "the fortune corpus is too small to cross chunks")
    (work / "f.txt.gz").write_bytes(gzip.compress(fortune_text))
    zstd_compress(fortune_text, work / "f.txt.zst")
    # Several gzip members and zstd frames in one file, as pigz/bgzip or `cat a.zst b.zst` make them.
    half = len(fortune_text) // 2
    (work / "multi.txt.gz").write_bytes(gzip.compress(fortune_text[:half]) + gzip.compress(fortune_text[half:]))
    zstd_compress(fortune_text[:half], work / "a.zst")
    zstd_compress(fortune_text[half:], work / "b.zst")
    (work / "multi.txt.zst").write_bytes((work / "a.zst").read_bytes() + (work / "b.zst").read_bytes())

    expected, expected_documents = reference_tokens(fortune_documents(fortune_text))
    build(work / "plain.tokens", plain, fmt="fortune")
    got, documents = tokens_of(work / "plain.tokens")
    check(got == expected and documents == expected_documents, "fortune: the plain file's tokens differ from the reference")
    for name in ["f.txt.gz", "f.txt.zst", "multi.txt.gz", "multi.txt.zst"]:
        out = work / (name + ".tokens")
        build(out, work / name, fmt="fortune")
        check(out.read_bytes() == (work / "plain.tokens").read_bytes(), f"fortune: {name} gives another token file than the plain one")

    # JSONL (auto: *.jsonl, *.jsonl.gz and *.jsonl.zst), with non-ASCII text and a line over 1 MiB.
    texts = ["naïve café – 日本語 ✓", "x" * (1_500_000), "line one\nline two", "  ", "tab\there \"quoted\""]
    texts += [" ".join(random.choice(["moe", "router", "expert", "token", "ß"]) for _ in range(random.randint(1, 400)))
              for _ in range(3000)]
    jsonl = "".join(json.dumps({"text": t, "id": i}, ensure_ascii=i % 2 == 0) + "\n" + ("\n" if i % 97 == 0 else "")
                    for i, t in enumerate(texts)).encode()
    (work / "c.jsonl").write_bytes(jsonl)
    (work / "c.jsonl.gz").write_bytes(gzip.compress(jsonl))
    zstd_compress(jsonl, work / "c.jsonl.zst")
    expected, expected_documents = reference_tokens([t.encode() for t in texts])
    build(work / "jsonl.tokens", work / "c.jsonl")
    got, documents = tokens_of(work / "jsonl.tokens")
    check(got == expected and documents == expected_documents, "jsonl: the plain file's tokens differ from the reference")
    for name in ["c.jsonl.gz", "c.jsonl.zst"]:
        out = work / (name + ".tokens")
        build(out, work / name)
        check(out.read_bytes() == (work / "jsonl.tokens").read_bytes(), f"jsonl: {name} gives another token file than the plain one")

    # A folder of text files (a file is a document), some compressed; a binary file and a text file with
    # a NUL past the first chunk are skipped whole, as before compression existed.
    folder, plain_folder = work / "folder", work / "plain_folder"
    folder.mkdir()
    plain_folder.mkdir()
    pieces = [fortune_text[i * 100_000:(i + 1) * 100_000] for i in range(5)] + [b"", b" \n\t"]
    for index, piece in enumerate(pieces):
        (plain_folder / f"{index}.txt").write_bytes(piece)
        if index % 3 == 0:
            (folder / f"{index}.txt").write_bytes(piece)
        elif index % 3 == 1:
            (folder / f"{index}.txt.gz").write_bytes(gzip.compress(piece))
        else:
            zstd_compress(piece, folder / f"{index}.txt.zst")
    zstd_compress(b"A" * (3 << 20) + b"\0tail", folder / "9_late_nul.txt.zst")  # past the 4 MiB token buffer
    (folder / "8_binary.bin.gz").write_bytes(gzip.compress(bytes(range(256)) * 10))
    build(work / "folder.tokens", folder, fmt="text")
    build(work / "plain_folder.tokens", plain_folder, fmt="text")
    expected, expected_documents = reference_tokens(pieces)
    got, documents = tokens_of(work / "folder.tokens")
    check(got == expected and documents == expected_documents, "text folder: tokens differ from the reference (skipped files?)")
    check((work / "folder.tokens").read_bytes() == (work / "plain_folder.tokens").read_bytes(),
          "text folder: the compressed folder gives another token file than the plain one")

    # Damaged files: one line naming the file and the check, non-zero exit, no output (nor .tmp) left. Each
    # damage is one the format always detects: a gzip member's CRC-32 (found after all its text was read)
    # or compression method, a zstd block of the reserved type, a second zstd frame's magic, a cut.
    def zstd_first_block(data):
        descriptor = data[4]
        single_segment, dictionary, size_flag = descriptor >> 5 & 1, descriptor & 3, descriptor >> 6
        return 5 + (0 if single_segment else 1) + [0, 1, 2, 4][dictionary] + [single_segment, 2, 4, 8][size_flag]

    good_gz, good_zst = (work / "f.txt.gz").read_bytes(), (work / "f.txt.zst").read_bytes()
    damaged = {
        "crc.txt.gz": good_gz[:-8] + bytes([good_gz[-8] ^ 1]) + good_gz[-7:],
        "method.txt.gz": good_gz[:2] + b"\x07" + good_gz[3:],
        "block.txt.zst": bytearray(good_zst),
        "second_frame.txt.zst": (work / "a.zst").read_bytes() + b"\x00\x00\x00\x00" + (work / "b.zst").read_bytes()[4:],
        "cut.txt.zst": good_zst[:len(good_zst) // 3],
        "cut.txt.gz": good_gz[:len(good_gz) // 3],
        "empty.txt.gz": b"",
        "misnamed.txt.zst": b"plain text, misnamed\n",
    }
    damaged["block.txt.zst"][zstd_first_block(good_zst)] |= 0b110  # block type 3: reserved
    words = {"crc": "corrupt gzip data", "method": "corrupt gzip data", "block": "corrupt zstd data", "second_frame": "corrupt zstd data",
             "cut": "ends early", "empty": "ends early", "misnamed": "corrupt zstd data"}
    for name, data in damaged.items():
        (work / name).write_bytes(bytes(data))
        out = work / "damaged.tokens"
        result = build(out, work / name, fmt="text", expect_ok=False)
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        wanted = words[name.split(".")[0]]
        check(result.returncode != 0 and str(work / name) in message and wanted in message and "-t " in message,
              f"{name}: expected a non-zero exit and an error naming the file and '{wanted}', got {result.returncode}: {message}")
        check(not out.exists() and not Path(str(out) + ".tmp").exists(), f"{name}: a partial output was left")
        print(f"{name}: {message}")
    # A damaged compressed file is reported even when what it decodes to looks binary (not skipped as such).
    binary_gz = gzip.compress(b"\0" * 1000)
    (work / "binary_crc.bin.gz").write_bytes(binary_gz[:-8] + bytes([binary_gz[-8] ^ 1]) + binary_gz[-7:])
    result = build(work / "damaged.tokens", work / "binary_crc.bin.gz", fmt="text", expect_ok=False)
    check(result.returncode != 0 and "corrupt gzip data" in result.stderr, f"a damaged binary .gz was skipped: {result.stderr.strip()}")

    # Parquet: refused by data build with the offline step named; that step gives the same tokens as JSONL.
    parquet_texts = texts[:500] + [None, "last"]
    table = pa.table({"id": list(range(len(parquet_texts))), "text": parquet_texts})
    pq.write_table(table.slice(0, 300), work / "p1.parquet", row_group_size=64)
    pq.write_table(table.slice(300), work / "p2.parquet", row_group_size=64)
    result = build(work / "p.tokens", work / "p1.parquet", expect_ok=False)
    check(result.returncode != 0 and "parquet_to_jsonl.py" in result.stderr and "p1.parquet" in result.stderr,
          f"a .parquet input is not refused with the offline step: {result.stderr.strip()}")
    for suffix in [".jsonl", ".jsonl.zst", ".jsonl.gz"]:
        converted = work / f"from_parquet{suffix}"
        step = subprocess.run([sys.executable, str(source / "scripts/parquet_to_jsonl.py"), "--out", str(converted),
                               str(work / "p1.parquet"), str(work / "p2.parquet")], capture_output=True, text=True)
        check(step.returncode == 0 and "501 rows" in step.stdout, f"parquet_to_jsonl.py {suffix}: {step.stdout}{step.stderr}")
        build(work / "parquet.tokens", converted)
        got, documents = tokens_of(work / "parquet.tokens")
        want, want_documents = reference_tokens([t.encode() for t in parquet_texts if t is not None])
        check(got == want and documents == want_documents, f"parquet via {suffix}: tokens differ from the texts'")
    step = subprocess.run([sys.executable, str(source / "scripts/parquet_to_jsonl.py"), "--column", "body", "--out",
                           str(work / "x.jsonl"), str(work / "p1.parquet")], capture_output=True, text=True)
    check(step.returncode != 0 and "no column 'body'" in step.stderr and not (work / "x.jsonl").exists(),
          f"a missing column is not refused clearly: {step.stderr.strip()}")

print(f"{0 if failures else 1} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
