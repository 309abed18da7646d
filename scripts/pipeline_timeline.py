#!/usr/bin/env python3
"""Draws a pipeline schedule's recorded trace (schedule.trace_dir) as a text timeline, one row per stage.

Each trace file holds one JSON object per line: {"stage", "kind" ("F" forward, "B" backward),
"micro_batch", "start", "end"} with times in seconds of the machine's monotonic clock (the stages of
one machine line up). A forward of micro-batch m
is drawn as the digit m, its backward as the letter a + m, idle time as '.'.
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
for stage in stages:
    row = ["."] * args.width
    for e in (e for e in events if e["stage"] == stage):
        first, last = int(e["start"] / end * args.width), max(int(e["start"] / end * args.width) + 1, int(e["end"] / end * args.width))
        mark = str(e["micro_batch"] % 10) if e["kind"] == "F" else chr(ord("a") + e["micro_batch"] % 26)
        for column in range(first, min(last, args.width)):
            row[column] = mark
    busy = sum(e["end"] - e["start"] for e in events if e["stage"] == stage)
    print(f"stage {stage}  {''.join(row)}  busy {100 * busy / end:.0f}%")
print(f"(one step, {end * 1000:.1f} ms; digits: forward of micro-batch m, letters: its backward, '.': idle)")
