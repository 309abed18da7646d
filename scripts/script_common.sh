# Sourced by the benchmark and check scripts: the repository root as working folder, the pithtrain
# binary in $bin (built when missing) and the default token file data/fortunes.tokens.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# PITHTRAIN_BIN names another binary (scripts/gpu_check.sh: the packed build in .gpu/).
bin=${PITHTRAIN_BIN:-${PITHTRAIN_BUILD_DIR:-build}/bin/pithtrain}
[ -x "$bin" ] || bash scripts/build.sh
# A machine without the fortunes package (the GPU machine) runs only what needs no fortunes.
[ -f data/fortunes.tokens ] || [ ! -d /usr/share/games/fortunes ] ||
  "$bin" data build --format fortune --out data/fortunes.tokens /usr/share/games/fortunes
