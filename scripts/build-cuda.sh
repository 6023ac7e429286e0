#!/usr/bin/env bash
# Builds warm with the `cuda` feature on a machine without a GPU, as a binary that starts
# (and serves on the CPU) where no CUDA driver is installed, and uses the GPU where one is.
#
#   bash scripts/build-cuda.sh [extra cargo args]     # -> target/cuda/release/warm
#   WARM_CUDA_CMD=clippy bash scripts/build-cuda.sh -- -D warnings   # lints the cuda code
#
# How (see ../shared/cuda-build.md for the measurements behind it):
# - nvcc 13.0 from PyPI wheels (scripts/install-nvcc.sh); CUDA_COMPUTE_CAP (default 90:
#   H100/H200) for candle's kernels and ours.
# - candle-core pins cudarc with `dynamic-linking`, which makes libcuda and cuBLAS load-time
#   dependencies. A copy of candle-core from the cargo registry whose Cargo.toml asks for
#   `dynamic-loading` instead is patched in (a [patch] given on the command line, under
#   target/cuda/, nothing committed): cudarc then opens the CUDA libraries when first used.
# - candle-kernels links -lcudart; a linker script named libcudart.so points that at the
#   static cudart of the wheels, so the binary needs no libcudart either.
# On the GPU machine, cuBLAS/cuRAND/NVRTC come from its CUDA 13 libraries: put their
# directory on LD_LIBRARY_PATH (scripts/gpu-check.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/install-nvcc.sh "${WARM_NVCC_DIR:-/tmp/warm-nvcc}")"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
TARGET=$(pwd)/target/cuda
mkdir -p "$TARGET"
cargo fetch --quiet
CANDLE_VERSION=$(sed -n '/^name = "candle-core"$/{n;s/^version = "\(.*\)"$/\1/p}' Cargo.lock)
SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"candle-core-$CANDLE_VERSION" | head -1)
PATCH=$TARGET/patched/candle-core
# Made once per candle version: copying it again would rebuild everything above it.
if [ ! -f "$TARGET/patched/candle-core-$CANDLE_VERSION.done" ]; then
  rm -rf "$PATCH"
  mkdir -p "$(dirname "$PATCH")"
  cp -r "$SRC" "$PATCH"
  if [ "$(grep -c '"dynamic-linking"' "$PATCH/Cargo.toml")" != 1 ]; then
    echo "candle-core $CANDLE_VERSION: expected one cudarc \"dynamic-linking\" feature to switch" >&2
    exit 1
  fi
  sed -i 's/"dynamic-linking"/"dynamic-loading"/' "$PATCH/Cargo.toml"
  touch "$TARGET/patched/candle-core-$CANDLE_VERSION.done"
fi
LINK=$TARGET/link
mkdir -p "$LINK"
echo "INPUT($CUDA_HOME/lib/libcudart_static.a -ldl -lrt -lpthread)" >"$LINK/libcudart.so"
# The patch rewrites Cargo.lock's candle-core entry: keep the committed one.
cp Cargo.lock "$TARGET/Cargo.lock.committed"
trap 'cp "$TARGET/Cargo.lock.committed" Cargo.lock' EXIT
CMD=${WARM_CUDA_CMD:-build}
RUSTFLAGS="-L native=$LINK" cargo "$CMD" --release --features cuda --target-dir "$TARGET" \
  --config "patch.crates-io.candle-core.path=\"$PATCH\"" "$@"
[ "$CMD" != build ] || ls -la "$TARGET/release/warm"
