#!/usr/bin/env bash
# The README's first command: installs what is missing, builds, prepares the default data (the fortune
# collections as byte-level tokens) and trains the tiny MoE on the CPU. Extra arguments go to pithtrain,
# e.g. scripts/run.sh --set train.steps=50 or scripts/run.sh --config configs/tiny.toml --plugins router_aux_free.so
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
bin=${PITHTRAIN_BUILD_DIR:-build}/bin/pithtrain
if [ ! -f data/fortunes.tokens ]; then
  "$bin" data build --format fortune --out data/fortunes.tokens /usr/share/games/fortunes
fi
config=configs/tiny.toml
for arg in "$@"; do [ "$arg" = "--config" ] && config=""; done
exec "$bin" ${config:+--config "$config"} "$@"
