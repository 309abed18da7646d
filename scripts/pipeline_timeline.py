#!/usr/bin/env python3
"""Draws a pipeline schedule's recorded trace (schedule.trace_dir) as a text timeline, one row per stage.

Each trace file holds one JSON object per line: {"stage", "kind" ("F" forward, "B" backward),
"micro_batch", "start", "end"} with times in seconds of the machine's monotonic clock (the stages of
one machine line up). A forward of micro-batch m
is drawn as the digit m, its backward as the letter a + m, idle time as '.'. dualpipev traces also
carry "chunk" (0 or 1) and "W" events (deferred weight gradients): each stage gets a row per chunk,
and W is drawn as 'w' on both.
Usage: scripts/pipeline_timeline.py TRACE_DIR [--width 100]
"""
import argparse, glob, json, os

parser = argparse.ArgumentParser()
parser.add_argument("trace_dir")
parser.add_argument("--width", type=int, default=100)
args = parser.parse_args()
events = []
for path in sorted(glob.glob(os.path.join(args.trace_dir, "*.jsonl"))):
    events += [json.loads(line) for line in open(path) if line.strip()]
if not events:
    raise SystemExit(f"no trace events in {args.trace_dir}")
origin = min(e["start"] for e in events)
for e in events:
    e["start"] -= origin
    e["end"] -= origin
end = max(e["end"] for e in events)
stages = sorted({e["stage"] for e in events})
chunked = any("chunk" in e for e in events)
for stage in stages:
    mine = [e for e in events if e["stage"] == stage]
    busy = sum(e["end"] - e["start"] for e in mine)
    for chunk in ((0, 1) if chunked else (None,)):
        row = ["."] * args.width
        for e in mine:
            if chunk is not None and e["kind"] != "W" and e.get("chunk") != chunk:
                continue
            first, last = int(e["start"] / end * args.width), max(int(e["start"] / end * args.width) + 1, int(e["end"] / end * args.width))
            if e["kind"] == "W":
                mark = "w"
            else:
                mark = str(e["micro_batch"] % 10) if e["kind"] == "F" else chr(ord("a") + e["micro_batch"] % 26)
            for column in range(first, min(last, args.width)):
                row[column] = mark
        label = f"stage {stage}" if chunk is None else f"stage {stage}.{chunk}"
        print(f"{label:<9} {''.join(row)}" + (f"  busy {100 * busy / end:.0f}%" if chunk in (None, 1) else ""))
legend = "digits: forward of micro-batch m, letters: its backward"
if chunked:
    legend += ", w: deferred weight gradients; stage S.C: chunk C of stage S"
print(f"(one step, {end * 1000:.1f} ms; {legend}, '.': idle)")
