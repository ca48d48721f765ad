#!/usr/bin/env bash
# Set up mimkit on a fresh machine: a virtual environment with the package and its tools, and the
# Fashion-MNIST files from Debian's dataset-fashion-mnist package when apt is available.
# Idempotent: a second run only checks. Usage: source scripts/setup.sh  (or bash scripts/setup.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.mimkit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing mimkit and its dependencies (torch from the local package mirror: about a minute)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import mimkit, torch, torchvision, timm" || { echo "[setup] install failed" >&2; exit 1; }
  touch "$stamp"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "[setup] could not install dataset-fashion-mnist; use data.root=<folder> or data.download=true"
  else
    echo "[setup] no apt: point data.root at the Fashion-MNIST IDX files or use data.download=true"
  fi
fi
echo "[setup] ready: $VENV/bin/mimkit"
