#!/usr/bin/env bash
# A checkpoint folder on a small tmpfs that holds the first checkpoint but not the second: the run
# exits non-zero with one line naming the file and saying the disk is full, leaves no partial file,
# keeps the first checkpoint loadable (Python's safetensors reads it) and, once the disk is larger,
# the same command resumes from it and ends as an uninterrupted run does.
# Args: PITHTRAIN_BIN FORTUNES_DIR PYTHON. Skips (77) where a tmpfs cannot be mounted.
set -u
bin=$(realpath "$1"); fortunes=$2; python=$3
if [ "$(id -u)" != 0 ]; then echo "SKIP: mounting a tmpfs needs root (running as uid $(id -u))"; exit 77; fi
work=$(mktemp -d)
folder=$work/run/checkpoints
cleanup() {
  if mountpoint -q "$folder"; then umount "$folder"; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$folder"
if ! mount -t tmpfs -o size=1m tmpfs "$folder" 2>"$work/mount.err"; then
  echo "SKIP: cannot mount a tmpfs here: $(head -c 300 "$work/mount.err")"; exit 77
fi
umount "$folder"
fail() { echo "FAIL $*"; exit 1; }
export OMP_NUM_THREADS=1  # idle OpenMP threads spin on a busy 2-core machine; every run gets the same

"$bin" data build --format fortune --out "$work/fortunes.tokens" "$fortunes" >/dev/null || fail "data build"
cat >"$work/disk_full.toml" <<EOF
[data]
path = "$work/fortunes.tokens"
[model]
vocab_size = 257
hidden_size = 64
num_layers = 2
num_heads = 4
num_kv_heads = 2
first_dense_layers = 1
dense_hidden_size = 128
[model.attention]
plugin = "gqa"
[model.moe]
num_experts = 4
top_k = 2
expert_hidden_size = 64
[model.moe.router]
plugin = "aux_free"
[model.moe.experts]
plugin = "grouped"
[optimizer]
plugin = "adamw"
[schedule]
plugin = "single"
[eval]
every = 0
batches = 1
[checkpoint]
every = 2
keep = 3
[train]
steps = 6
batch_size = 2
seq_len = 32
lr = 3e-3
warmup_steps = 2
log_every = 1
seed = 5
EOF
run=("$bin" --config "$work/disk_full.toml")

# The uninterrupted run, on an ordinary disk: its losses, and the size of one checkpoint.
"${run[@]}" --out "$work/reference" >"$work/reference.log" 2>&1 || { cat "$work/reference.log"; fail "reference run"; }
size=$(stat -c %s "$work/reference/checkpoints/step_000000002.safetensors")
# Room for one checkpoint and a half: step 2 fits, step 4's temporary file runs out of space.
mount -t tmpfs -o size=$((size * 3 / 2)) tmpfs "$folder" || fail "mount"

"${run[@]}" --out "$work/run" >"$work/full.out" 2>"$work/full.err"
code=$?
[ $code -ne 0 ] || fail "the run on a full disk exited 0"
error=$(grep -c . "$work/full.err")
[ "$error" = 1 ] || { cat "$work/full.err"; fail "stderr has $error lines, not one error line"; }
grep -qE "^pithtrain: error: cannot save '$folder/step_000000004\.safetensors': disk full \(No space left on device\)" "$work/full.err" ||
  { cat "$work/full.err"; fail "the error does not name step_000000004.safetensors and say the disk is full"; }
grep -q "the newest complete checkpoint is $folder/step_000000002.safetensors" "$work/full.err" ||
  { cat "$work/full.err"; fail "the error does not name the checkpoint that is kept"; }
echo "ok   full disk: exit $code, $(cat "$work/full.err")"
left=$(ls "$folder")
[ "$left" = "step_000000002.safetensors" ] || fail "the checkpoint folder holds '$left', not just step_000000002.safetensors"
used=$(df --output=used -B1 "$folder" | tail -1)
[ "$used" -lt $((size * 5 / 4)) ] || fail "the tmpfs still has $used bytes used: the partial file's space was not freed"
echo "ok   no partial file left ($used bytes used on the tmpfs, one checkpoint is $size)"

"$python" - "$folder/step_000000002.safetensors" "$work/reference/checkpoints/step_000000002.safetensors" <<'EOF' || fail "python safetensors"
import sys
from safetensors import safe_open
kept, reference = sys.argv[1:3]
with safe_open(kept, framework="numpy") as a, safe_open(reference, framework="numpy") as b:
    assert a.metadata()["step"] == "2", a.metadata()
    assert sorted(a.keys()) == sorted(b.keys())
    names = list(a.keys())
    for name in names:
        assert a.get_tensor(name).tobytes() == b.get_tensor(name).tobytes(), name
print(f"ok   Python's safetensors reads the kept checkpoint: {len(names)} tensors equal to the uninterrupted run's")
EOF

# More room: the same command resumes from step 2 and ends as the uninterrupted run did.
mount -o remount,size=64m "$folder" || fail "remount"
"${run[@]}" --out "$work/run" >"$work/resume.log" 2>&1 || { cat "$work/resume.log"; fail "the rerun after freeing space"; }
grep -q "resumed from $folder/step_000000002.safetensors at step 2" "$work/resume.log" ||
  { cat "$work/resume.log"; fail "the rerun did not resume from step 2"; }
fields() { "$python" -c '
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    print(row["step"], row["loss"], row["cross_entropy"], row["grad_norm"], row["lr"])' "$1"; }
diff <(fields "$work/reference/metrics.jsonl") <(fields "$work/run/metrics.jsonl") || fail "losses differ from the uninterrupted run"
cmp -s "$work/reference/model.safetensors" "$work/run/model.safetensors" || fail "final weights differ from the uninterrupted run"
echo "ok   after remounting larger the rerun resumed from step 2 and matched the uninterrupted run"
