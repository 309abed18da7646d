# Sourced by the multi-process ctest scripts (fully_sharded, pipeline, context_parallel) with their
# arguments PITHTRAIN_BIN FORTUNES_DIR: the work folder (KEEP_WORK=DIR keeps it), a token file, and
# `run` / `expect_error`.
set -eu
bin=$1; fortunes=$2
work=${KEEP_WORK:-$(mktemp -d)}; [ -n "${KEEP_WORK:-}" ] || trap 'rm -rf "$work"' EXIT; mkdir -p "$work"
"$bin" data build --format fortune --out "$work/tokens" "$fortunes/literature" > /dev/null
run() {  # run NAME [launch args --] pithtrain args...: NAME.log, and the log shown on failure
  local name=$1; shift
  "$bin" "$@" > "$work/$name.log" 2>&1 || { echo "run $name failed:"; cat "$work/$name.log"; exit 1; }
}
expect_error() {  # expect_error NAME TEXT pithtrain args...: the command fails and its output contains TEXT
  local name=$1 text=$2; shift 2
  if "$bin" "$@" > "$work/$name.log" 2>&1; then echo "$name was accepted"; exit 1; fi
  grep -qF -- "$text" "$work/$name.log" || { echo "$name: expected '$text' in:"; cat "$work/$name.log"; exit 1; }
}
