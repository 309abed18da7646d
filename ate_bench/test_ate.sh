#!/usr/bin/env bash
# ctest `ate_bench`: the harness end to end. A fake agent in Claude Code's stream-json format answers one
# task (turns counted, ledger read, check passes), a lazy agent fails it, `ate report` compares the two
# sets with a chart, and `ate selftest` proves every non-slow check honest. Uses the build in
# $PITHTRAIN_BUILD_DIR (default build/).
set -eu
ate=$(cd "$(dirname "$0")" && pwd)/ate
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# An agent that "thinks" in three assistant messages (one repeated, as stream-json repeats a message per
# content block), runs pithtrain once (the ledger must see it) and writes the reference answer.
cat > "$work/agent.sh" <<'AGENT'
for id in msg_1 msg_2 msg_2 msg_3; do
  echo "{\"type\":\"assistant\",\"message\":{\"id\":\"$id\",\"content\":[{\"type\":\"text\",\"text\":\"...\"}]}}"
done
echo '{"type":"result","subtype":"success"}'
"$(cd "$ATE_REPO" && realpath -m "${PITHTRAIN_BUILD_DIR:-build}")/bin/pithtrain" explain > /dev/null
ate_bench/ledger_wrap --device cuda:7 sleep 0.1   # another framework's process, counted the same way
grep -q "learning rate" "$ATE_PROMPT_FILE"
cat > answer.md <<'ANSWER'
learning_rate() in core/src/trainer.cpp: linear warmup lr * step / warmup_steps, then cosine
min_lr + 0.5 (lr - min_lr)(1 + cos(pi progress)).
ANSWER
# The number from the copy's configs/tiny.toml, whatever it holds (the task asks about that file).
python3 - >> answer.md <<'PY'
import math, tomllib
train = tomllib.load(open("configs/tiny.toml", "rb")).get("train", {})
steps, lr = train.get("steps", 300), train.get("lr", 3e-3)
min_lr, warmup = train.get("min_lr", lr * 0.1), train.get("warmup_steps", min(100, steps // 10))
print(f"lr at step 300: {min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (300 - warmup) / (steps - warmup))):.7g}")
PY
AGENT
"$ate" run understand-learning-rate --agent "bash $work/agent.sh" --out "$work/good/run1" --label good > "$work/good.out"
python3 - "$work/good/run1/result.json" <<'PY'
import json, sys
result = json.load(open(sys.argv[1]))
assert result["passed"] is True, result
assert result["agent_turns"] == 3, result["agent_turns"]
compute = result["active_compute_seconds"]
assert result["pithtrain_processes"] == 2 and compute["cpu"] > 0 and compute["cuda:7"] >= 0.1, result
assert len(result["commit"]) == 40, result["commit"]
print("good agent: passed, 3 turns, ledger", result["active_compute_seconds"])
PY
if "$ate" run understand-learning-rate --agent "echo 'I did nothing'" --out "$work/lazy/run1" --label lazy > "$work/lazy.out"; then
  echo "a lazy agent passed the check"; exit 1
fi
grep -q '"agent_turns": "unknown"' "$work/lazy/run1/result.json"
echo "lazy agent: failed, turns unknown"
"$ate" report "$work/good" "$work/lazy" --png "$work/compare.png" | tee "$work/report.txt"
grep -q "understand-learning-rate" "$work/report.txt" && grep -q "good" "$work/report.txt" && grep -q "lazy" "$work/report.txt"
test -s "$work/compare.png"
"$ate" selftest
