#!/usr/bin/env bash
# Command-line checks: exit codes and messages a user sees. Args: PITHTRAIN_BIN SOURCE_DIR FORTUNES_DIR
set -u
bin=$(realpath "$1"); source_dir=$(realpath "$2"); fortunes=$3
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
failures=0
check() {  # check NAME EXPECTED_EXIT(0|nonzero) PATTERN -- command...
  local name=$1 expected=$2 pattern=$3; shift 4
  "$@" >"$work/out" 2>&1; local code=$?
  if { [ "$expected" = 0 ] && [ $code -ne 0 ]; } || { [ "$expected" = nonzero ] && [ $code -eq 0 ]; }; then
    echo "FAIL $name: exit $code, expected $expected"; cat "$work/out"; failures=$((failures + 1)); return
  fi
  if ! grep -qE -- "$pattern" "$work/out"; then
    echo "FAIL $name: output lacks /$pattern/"; cat "$work/out"; failures=$((failures + 1)); return
  fi
  echo "ok   $name"
}
cd "$work"
check "data tool" 0 "documents from" -- "$bin" data build --format fortune --out data/fortunes.tokens "$fortunes"
# The tests' own config: configs/*.toml may change freely.
test_config=$source_dir/tests/configs/tiny.toml
config=(--config "$test_config")
small=(--set model.hidden_size=32 --set model.num_layers=2 --set train.seq_len=32 --set train.batch_size=2 --set train.steps=2)
# The router plugins that exist (whichever are installed), as the "available:" list names them.
routers=$("$bin" plugins --json | python3 -c 'import json, sys
print(", ".join(sorted(p["name"] for p in json.load(sys.stdin) if p["kind"] == "router")))')
check "nonexistent plugin" nonzero "unknown router plugin 'nonexistent'.*available: $routers;" -- \
  "$bin" "${config[@]}" --set model.moe.router.plugin=nonexistent
check "nonexistent --plugins file" nonzero "no such file on the plugin search path" -- "$bin" "${config[@]}" --plugins router_nope.so
check "typo key" nonzero "did you mean 'train.steps'" -- "$bin" "${config[@]}" --set train.stpes=3
check "missing config" nonzero "cannot read config file" -- "$bin" --config /nonexistent.toml
check "help" 0 "usage: pithtrain" -- "$bin" --help
# The default config is a file read at run time: the source tree's configs/tiny.toml for a build, the
# installed share/pithtrain/configs/tiny.toml beside an installed binary (here: the tests' config there).
check "help names the default config" 0 "Default config \(without --config\): $source_dir/configs/tiny.toml" -- "$bin" --help
mkdir -p prefix/bin prefix/share/pithtrain/configs && cp "$bin" prefix/bin/ && cp "$test_config" prefix/share/pithtrain/configs/tiny.toml
check "installed default config" 0 "Default config \(without --config\): $work/prefix/share/pithtrain/configs/tiny.toml" -- \
  prefix/bin/pithtrain --help
check "plain pithtrain trains the installed default config" 0 "done:" -- prefix/bin/pithtrain "${small[@]}" --out run_default
check "... whose run.name it took" 0 "name = .test_tiny." -- cat run_default/config.toml
check "plugins list" 0 "router +aux_free" -- "$bin" plugins
check "plugins json" 0 '"kind":"experts","name":"grouped"' -- "$bin" plugins --json
check "plugin check" 0 "^[0-9]+ passed, 0 failed" -- "$bin" plugin check "$(dirname "$bin")/../lib/plugins/router_aux_free.so"
check "headline: --plugins router_aux_free.so" 0 "model.moe.router.plugin += aux_free" -- \
  "$bin" "${config[@]}" --plugins router_aux_free.so "${small[@]}" --out run_aux_free
check "run dir outputs" 0 "expert_bias" -- grep -a -o expert_bias run_aux_free/model.safetensors
check "plot" 0 "wrote .*router_load.png" -- "$bin" plot run_aux_free
check "plot writes PNGs" 0 "PNG" -- head -c 4 run_aux_free/loss.png
check "plot draws the expert-load heat map" 0 "PNG" -- head -c 4 run_aux_free/expert_load.png
check "plot without metrics" nonzero "no metrics at" -- "$bin" plot /nonexistent_run
# Both extra search-path sources are honoured: a copy of a plugin there is reported as a duplicate.
mkdir -p extra_plugins && cp "$(dirname "$bin")/../lib/plugins/router_aux_free.so" extra_plugins/
check "PITHTRAIN_PLUGIN_PATH" nonzero "two files provide router plugin 'aux_free'.*extra_plugins/router_aux_free.so" -- \
  env PITHTRAIN_PLUGIN_PATH="$work/extra_plugins" "$bin" "${config[@]}" "${small[@]}" --out run_duplicate
check "plugins.paths" nonzero "two files provide router plugin 'aux_free'" -- \
  "$bin" "${config[@]}" "${small[@]}" --set "plugins.paths=[\"$work/extra_plugins\"]" --out run_duplicate
check "--set picks topk_softmax" 0 "router.plugin += topk_softmax" -- \
  "$bin" "${config[@]}" --set model.moe.router.plugin=topk_softmax "${small[@]}" --out run_topk

# SIGINT finishes the step, saves a checkpoint and exits 0; the same command then resumes.
long=(--config "$test_config" --set model.hidden_size=32 --set model.num_layers=2 --set train.seq_len=32
      --set train.batch_size=2 --set train.steps=100000 --set train.log_every=1 --out run_interrupted)
"$bin" "${long[@]}" >interrupt.log 2>&1 &
pid=$!
for _ in $(seq 1 300); do grep -q "step  *20/" interrupt.log 2>/dev/null && break; sleep 0.1; done
kill -INT $pid; wait $pid; code=$?
if [ $code -eq 0 ] && grep -q "stopped by signal 2" interrupt.log && ls run_interrupted/checkpoints/step_*.safetensors >/dev/null 2>&1; then
  echo "ok   SIGINT saves and exits cleanly"
else
  echo "FAIL SIGINT: exit $code"; cat interrupt.log; failures=$((failures + 1))
fi
check "rerun resumes" 0 "resumed from .*run_interrupted/checkpoints/step_" -- "$bin" "${long[@]/train.steps=100000/train.steps=25}"
check "profile" 0 "operator \(by self time\)" -- "$bin" "${config[@]}" "${small[@]}" --set train.steps=4 --profile 2-3 --out run_profile
check "profile trace written" 0 "traceEvents" -- head -c 2000 run_profile/profile_steps_2-3.json
echo "cli: $failures failed"
[ $failures -eq 0 ]
