#!/usr/bin/env bash
# One-step setup on a fresh machine: CPU PyTorch first (so pip never pulls a CUDA build),
# then CliCooper with its dev extras, then the default dataset (Fashion-MNIST, Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev]"

FMNIST=train-images-idx3-ubyte.gz
USER_DIR="${CLICOOPER_DATA_DIR:-$HOME/.local/share/clicooper}/fashion-mnist"
if [ -f "/usr/share/datasets/fashion-mnist/$FMNIST" ] || [ -f "$USER_DIR/$FMNIST" ]; then
    echo "setup: Fashion-MNIST already present"
elif [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
else
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download dataset-fashion-mnist)
    dpkg-deb -x "$tmp"/dataset-fashion-mnist_*.deb "$tmp/x"
    mkdir -p "$USER_DIR"
    cp "$tmp"/x/usr/share/datasets/fashion-mnist/* "$USER_DIR/"
    rm -rf "$tmp"
    echo "setup: Fashion-MNIST unpacked into $USER_DIR"
fi
echo "setup: done"
