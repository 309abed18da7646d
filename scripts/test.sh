#!/usr/bin/env bash
# The README's second command: installs what is missing, builds, and runs every test with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
cd "${PITHTRAIN_BUILD_DIR:-build}"
ctest --output-on-failure -j "${PITHTRAIN_JOBS:-2}" "$@"
