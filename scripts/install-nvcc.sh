#!/usr/bin/env bash
# Installs nvcc (CUDA 13.0) from PyPI wheels into DIR (default /tmp/warm-nvcc) and prints
# the CUDA_HOME to export. No GPU and no NVIDIA apt repository needed. 13.0 is pinned so
# the PTX version (9.0) is one that driver 580 (the lent GPU machines) accepts; cccl
# brings the headers candle's own kernels include.
#
#   eval "$(bash scripts/install-nvcc.sh [DIR])"   # sets CUDA_HOME and PATH
set -euo pipefail
DIR=${1:-/tmp/warm-nvcc}
HOME_DIR=$DIR/nvidia/cu13
if [ ! -x "$HOME_DIR/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$DIR" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 >&2
fi
"$HOME_DIR/bin/nvcc" --version >&2
echo "export CUDA_HOME=$HOME_DIR PATH=$HOME_DIR/bin:\$PATH"
