#!/usr/bin/env python3
"""Checks a recorded dualpipev trace (schedule.trace_dir) against the published DualPipeV bubble.

Reads stage_S.jsonl (one event per line: stage, kind F/B/W, chunk, micro_batch, deferred, pair, start,
end) and
  1. checks the trace: every stage runs M forwards and M backwards of each chunk, as many W as
     deferred backwards, and each forward/backward starts after the one it needs ended;
  2. replays each stage's recorded order with given durations (F a forward, B a whole backward, W
     deferred weight gradients, a deferred backward B - W, a forward/backward pair F&B), each
     operation starting when its stage is free and its input is ready, and compares every stage's
     idle time with the published (P - 1)(F&B + B - 3W): equal on every stage when F&B = F + B, and
     equal on the busiest stage when the pair overlaps (F&B < F + B);
  3. prints the measured wall-clock bubble and the formula with the measured mean durations.
Exits non-zero when a check fails. Usage: scripts/pipeline_bubble.py TRACE_DIR
"""
import glob, json, os, sys


def load(trace_dir):
    stages = {}
    for path in sorted(glob.glob(os.path.join(trace_dir, "stage_*.jsonl"))):
        events = [json.loads(line) for line in open(path) if line.strip()]
        if events:
            stages[events[0]["stage"]] = events
    if not stages:
        raise SystemExit(f"no trace events in {trace_dir}")
    if sorted(stages) != list(range(len(stages))):
        raise SystemExit(f"{trace_dir}: stages {sorted(stages)} are not 0..P-1")
    for events in stages.values():
        if any("chunk" not in e for e in events):
            raise SystemExit(f"{trace_dir}: not a dualpipev trace (events without a chunk)")
    return [stages[s] for s in range(len(stages))]


def producer(kind, chunk, micro_batch, stage, stages):
    """The event whose end a forward/backward waits for: (kind, chunk, micro_batch, stage), or None."""
    if kind == "F":
        if chunk == 0:
            return None if stage == 0 else ("F", 0, micro_batch, stage - 1)
        return ("F", 0, micro_batch, stage) if stage == stages - 1 else ("F", 1, micro_batch, stage + 1)
    if chunk == 1:
        return ("F", 1, micro_batch, 0) if stage == 0 else ("B", 1, micro_batch, stage - 1)
    return ("B", 1, micro_batch, stage) if stage == stages - 1 else ("B", 0, micro_batch, stage + 1)


def operations(events):
    """A stage's events as its operations: a pair's two events become one."""
    result = []
    for e in events:
        if e["pair"] >= 0 and result and result[-1][0]["pair"] == e["pair"]:
            result[-1].append(e)
        else:
            result.append([e])
    return result


def check_trace(stages):
    count = len(stages)
    micro = sum(1 for e in stages[0] if e["kind"] == "F" and e["chunk"] == 0)
    ends = {(e["kind"], e["chunk"], e["micro_batch"], s): e["end"] for s, events in enumerate(stages) for e in events if e["kind"] != "W"}
    for s, events in enumerate(stages):
        for kind in "FB":
            for chunk in (0, 1):
                got = sorted(e["micro_batch"] for e in events if e["kind"] == kind and e["chunk"] == chunk)
                assert got == list(range(micro)), f"stage {s}: {kind} of chunk {chunk} ran for {got}, expected 0..{micro - 1}"
        deferred = sum(1 for e in events if e["kind"] == "B" and e["deferred"])
        weights = sum(1 for e in events if e["kind"] == "W")
        assert deferred == weights and weights > 0, f"stage {s}: {deferred} deferred backwards but {weights} W"
        for e in events:
            if e["kind"] == "W":
                continue
            needed = producer(e["kind"], e["chunk"], e["micro_batch"], s, count)
            if needed is not None:
                assert e["start"] >= ends[needed] - 1e-3, f"stage {s}: {e} started before {needed} ended"
    return count, micro


def replay(stages, forward, backward, weights, pair):
    """Idle time of each stage when its recorded order runs with these durations."""
    count = len(stages)
    programs = [operations(events) for events in stages]
    position, clock, busy, done = [0] * count, [0.0] * count, [0.0] * count, {}
    progress = True
    while progress:
        progress = False
        for s in range(count):
            while position[s] < len(programs[s]):
                op = programs[s][position[s]]
                ready = clock[s]
                needs = [producer(e["kind"], e["chunk"], e["micro_batch"], s, count) for e in op if e["kind"] != "W"]
                if any(n is not None and n not in done for n in needs):
                    break
                for n in needs:
                    if n is not None:
                        ready = max(ready, done[n])
                if len(op) == 2:
                    cost = pair
                elif op[0]["kind"] == "F":
                    cost = forward
                elif op[0]["kind"] == "W":
                    cost = weights
                else:
                    cost = backward - weights if op[0]["deferred"] else backward
                clock[s] = ready + cost
                busy[s] += cost
                for e in op:
                    if e["kind"] != "W":
                        done[(e["kind"], e["chunk"], e["micro_batch"], s)] = clock[s]
                position[s] += 1
                progress = True
    stuck = [s for s in range(count) if position[s] < len(programs[s])]
    assert not stuck, f"the recorded order cannot complete: stages {stuck} wait forever"
    end = max(clock)
    return [end - b for b in busy]


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    stages = load(sys.argv[1])
    count, micro = check_trace(stages)
    print(f"trace: {count} stage(s) x 2 chunks, {micro} micro-batches; counts and data dependencies hold")
    for forward, backward, weights, pair in ((1.0, 2.0, 1.0, 3.0), (1.0, 2.0, 0.5, 3.0), (1.0, 3.0, 1.0, 4.0), (1.0, 2.0, 1.0, 2.5)):
        idle = replay(stages, forward, backward, weights, pair)
        formula = (count - 1) * (pair + backward - 3 * weights)
        overlapped = pair < forward + backward
        ok = abs(max(idle) - formula) < 1e-9 and (overlapped or all(abs(i - formula) < 1e-9 for i in idle))
        print(f"replay F={forward:g} B={backward:g} W={weights:g} F&B={pair:g}: idle per stage "
              f"{', '.join(f'{i:g}' for i in idle)}; (P-1)(F&B+B-3W) = {formula:g} {'ok' if ok else 'MISMATCH'}")
        assert ok, "the replayed bubble differs from the published formula"
    # Measured: each stage's idle share of the step, and the formula with the mean measured durations.
    start = min(e["start"] for events in stages for e in events)
    end = max(e["end"] for events in stages for e in events)
    def mean(values):
        return sum(values) / len(values) if values else 0.0
    every = [e for events in stages for e in events]
    lone = [e for e in every if e["pair"] < 0]
    forward = mean([e["end"] - e["start"] for e in lone if e["kind"] == "F"])
    backward = mean([e["end"] - e["start"] for e in every if e["kind"] == "B" and not e["deferred"]])
    weights = mean([e["end"] - e["start"] for e in every if e["kind"] == "W"])
    pairs = {}
    for s, events in enumerate(stages):
        for e in events:
            if e["pair"] >= 0:
                first, last = pairs.get((s, e["pair"]), (e["start"], e["end"]))
                pairs[(s, e["pair"])] = (min(first, e["start"]), max(last, e["end"]))
    pair = mean([b - a for a, b in pairs.values()])
    idle = [(end - start) - sum(e["end"] - e["start"] for e in events) for events in stages]
    formula = (count - 1) * (pair + backward - 3 * weights)
    print(f"measured: step {1e3 * (end - start):.1f} ms, idle per stage " + ", ".join(f"{1e3 * i:.1f}" for i in idle) +
          f" ms; F {1e3 * forward:.2f}, B {1e3 * backward:.2f}, W {1e3 * weights:.2f}, F&B {1e3 * pair:.2f} ms "
          f"-> (P-1)(F&B+B-3W) = {1e3 * formula:.1f} ms")


if __name__ == "__main__":
    main()
