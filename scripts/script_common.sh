# Sourced by the benchmark and check scripts: the repository root as working folder, the pithtrain
# binary in $bin (built when missing) and the default token file data/fortunes.tokens.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin=${PITHTRAIN_BUILD_DIR:-build}/bin/pithtrain
[ -x "$bin" ] || bash scripts/build.sh
[ -f data/fortunes.tokens ] || "$bin" data build --format fortune --out data/fortunes.tokens /usr/share/games/fortunes
