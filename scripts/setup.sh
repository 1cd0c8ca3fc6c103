#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: the Fashion-MNIST Debian package and a virtual environment in
# .venv with ptsbench installed editable. pip resolves torch and torchvision together as a matching pair.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "setup: installing the Debian package dataset-fashion-mnist" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY="${PYTHON:-python3}"
stamp=".venv/.ptsbench-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv and installing ptsbench (about 2 minutes the first time)" >&2
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,joblib,submitit,realweights]"
  .venv/bin/python -c "import torch, torchvision, timm; print('setup: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" >&2
  echo "$want" > "$stamp"
fi
