# Sourced by the reference solutions (the scripted agent of `ate selftest`): sets BIN to a pithtrain of
# this checkout and makes data/fortunes.tokens. To keep the selftest short it uses the benchmarked
# repository's existing build of the same sources when there is one; otherwise it builds the copy.
set -eu
prebuilt=$(cd "${ATE_REPO:-.}" && realpath -m "${PITHTRAIN_BUILD_DIR:-build}")/bin/pithtrain
if [ -n "${ATE_REPO:-}" ] && [ -x "$prebuilt" ]; then
  BIN=$prebuilt
else
  bash scripts/build.sh >/dev/null
  BIN="$PWD/build/bin/pithtrain"
fi
if [ ! -f data/fortunes.tokens ]; then
  mkdir -p data
  "$BIN" data build --format fortune --out data/fortunes.tokens /usr/share/games/fortunes >/dev/null
fi
turn() { echo "{\"role\": \"assistant\", \"content\": \"$1\"}" >> "$ATE_TRANSCRIPT"; }
