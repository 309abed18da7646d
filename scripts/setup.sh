#!/usr/bin/env bash
# Installs everything PithTrain needs on a fresh Debian machine; idempotent, called by run.sh and test.sh.
# Prints the environment to source at the end (PITHTRAIN_VENV, CMAKE_PREFIX_PATH).
set -euo pipefail

TORCH_VERSION=2.11.0
PITHTRAIN_CACHE=${PITHTRAIN_CACHE:-$HOME/.cache/pithtrain}
PITHTRAIN_VENV=${PITHTRAIN_VENV:-$PITHTRAIN_CACHE/venv-torch$TORCH_VERSION}
say() { echo "[setup] $*" >&2; }

# --- Debian packages -------------------------------------------------------
apt_packages=(g++ cmake ninja-build ccache libboost-dev libtomlplusplus-dev libspdlog-dev libfmt-dev
              libgtest-dev fortunes python3-venv gnuplot-nox libsentencepiece-dev sentencepiece libgloo-dev
              zlib1g-dev libzstd-dev)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq >&2
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- LibTorch from the PyTorch wheel, in a venv outside the clone ----------
find_python() {
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
if ! "$PITHTRAIN_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  python=$(find_python) || { say "no python3 with venv found; install python3-venv"; exit 1; }
  say "creating venv $PITHTRAIN_VENV with $python and installing torch==$TORCH_VERSION (about 5 GB, a few minutes)"
  mkdir -p "$(dirname "$PITHTRAIN_VENV")"
  "$python" -m venv "$PITHTRAIN_VENV"
  "$PITHTRAIN_VENV/bin/python" -m pip install -q --upgrade pip >&2
  if ! "$PITHTRAIN_VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy >&2; then
    say "ERROR: could not install torch==$TORCH_VERSION from PyPI; PithTrain is pinned to it (the GPU machine's version)."
    say "Fix the network or pip, or point PITHTRAIN_VENV at a venv that has torch==$TORCH_VERSION."
    exit 1
  fi
fi
# Python packages for the offline steps (tokenizer.json: scripts/tokenize_hf.py; Parquet:
# scripts/parquet_to_jsonl.py) and the tests (parity against transformers in tests/parity/, TensorBoard's
# reader of the event files the trainer writes); never used at training time.
python_packages=("tokenizers==0.23.3" "transformers==5.24.0" "safetensors==0.8.0" "pyarrow==26.0.1" "tensorboard==2.21.0")
if ! "$PITHTRAIN_VENV/bin/python" -c "
import sys, importlib.metadata as m
wanted = dict(p.split('==') for p in sys.argv[1:])
sys.exit(any(m.version(name) != version for name, version in wanted.items()))" "${python_packages[@]}" 2>/dev/null; then
  say "installing ${python_packages[*]} into $PITHTRAIN_VENV"
  "$PITHTRAIN_VENV/bin/python" -m pip install -q "${python_packages[@]}" >&2
fi
torch_cmake=$("$PITHTRAIN_VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "share", "cmake"))')
echo "export PITHTRAIN_VENV=$PITHTRAIN_VENV"
echo "export PITHTRAIN_TORCH_CMAKE=$torch_cmake"
