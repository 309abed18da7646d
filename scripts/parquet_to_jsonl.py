#!/usr/bin/env python3
"""Offline step for Parquet corpora (docs/data.md, "Parquet"): the text column of Parquet files becomes a
JSONL file (one {"text": ...} per row) that `pithtrain data build` reads. Streams one record batch at a
time, so a file of any size fits; rows whose text is null are skipped. The output is compressed by its
name: OUT.jsonl.zst (zstd) or OUT.jsonl.gz (gzip), else plain. Needs pyarrow (in the project's venv):

    ~/.cache/pithtrain/venv-torch2.11.0/bin/python scripts/parquet_to_jsonl.py --out corpus.jsonl.zst shards/*.parquet
    build/bin/pithtrain data build --out data/corpus.tokens corpus.jsonl.zst
"""
import argparse
import json
import sys
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSONL file to write (.jsonl, .jsonl.gz or .jsonl.zst)")
    parser.add_argument("--column", default="text", help="the column holding the text (default: text)")
    parser.add_argument("--batch-rows", type=int, default=8192, help="rows read at a time (memory grows with it)")
    parser.add_argument("inputs", nargs="+", help="Parquet files, or folders of *.parquet files (sorted)")
    args = parser.parse_args()
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("error: pyarrow is missing; run this with the project's venv (scripts/setup.sh installs pyarrow there)")

    files = []
    for name in args.inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(path.rglob("*.parquet"))
        elif path.is_file():
            files.append(path)
        else:
            sys.exit(f"error: '{name}': no such file or folder")
    if not files:
        sys.exit("error: no *.parquet files in the given inputs")

    out = Path(args.out)
    codec = {".zst": "zstd", ".gz": "gzip"}.get(out.suffix)
    temporary = out.with_name(out.name + ".tmp")  # renamed when complete, like pithtrain's own outputs
    rows = skipped = 0
    try:
        sink = pa.CompressedOutputStream(str(temporary), codec) if codec else pa.OSFile(str(temporary), "wb")
        with sink:
            for file in files:
                try:
                    parquet = pq.ParquetFile(file)
                except Exception as error:  # pyarrow's own message says what is wrong
                    sys.exit(f"error: '{file}' is not a readable Parquet file ({error})")
                if args.column not in parquet.schema_arrow.names:
                    sys.exit(f"error: '{file}' has no column '{args.column}' (columns: {', '.join(parquet.schema_arrow.names)}); "
                             "pass --column NAME")
                for batch in parquet.iter_batches(batch_size=args.batch_rows, columns=[args.column]):
                    for text in batch.column(0).to_pylist():
                        if text is None:
                            skipped += 1
                            continue
                        if not isinstance(text, str):
                            sys.exit(f"error: '{file}': column '{args.column}' holds {type(text).__name__}, not text; pass --column NAME")
                        sink.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
                        rows += 1
        temporary.replace(out)
    finally:
        temporary.unlink(missing_ok=True)
    print(f"wrote {out}: {rows} rows from {len(files)} files" + (f" ({skipped} null texts skipped)" if skipped else ""))


if __name__ == "__main__":
    main()
