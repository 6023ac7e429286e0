#!/usr/bin/env bash
# One script for a lent GPU machine: builds nothing, runs every GPU check of warm and
# prints one table (kernel vs CPU reference, kernel bandwidth vs a device copy, fusion of a
# multi-GB set on the device vs reading it and PCIe, GPU vs CPU scores on the parity
# fixtures, scoring throughput of the demo WARM set).
#
# Here (no GPU):   bash scripts/build-cuda.sh && bash scripts/gpu-check.sh --prepare
#                  (strips the binaries into target/gpu-carry/, under the 64 MiB carry limit)
# There:           bash scripts/gpu-check.sh          (device tool: carry target/gpu-carry)
#
# Options: GPU_CHECK_MEMBERS (default 4), GPU_CHECK_HIDDEN/LAYERS/VOCAB (default
# 2048/16/128000: about 1.3 GB per bf16 member), GPU_CHECK_WORK (default /tmp/warm-gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry
if [ "${1:-}" = "--prepare" ]; then
  # Stripped, the cuda binary is ~65 MB (candle's kernels are inside): gzip brings it to
  # ~17 MB, under the device tool's 64 MiB carry limit.
  rm -rf "$CARRY"
  mkdir -p "$CARRY"
  strip -o "$CARRY/warm" target/cuda/release/warm
  gzip -9 "$CARRY/warm"
  cargo build --release --quiet --example synthetic_members
  strip -o "$CARRY/synthetic_members" target/release/examples/synthetic_members
  du -sh "$CARRY"/*
  exit 0
fi
WORK=${GPU_CHECK_WORK:-/tmp/warm-gpu-check}
mkdir -p "$WORK"
[ -f "$CARRY/warm.gz" ] || { echo "no $CARRY/warm.gz: run 'bash scripts/gpu-check.sh --prepare' on the build machine and carry $CARRY" >&2; exit 2; }
BIN=$WORK/warm
gzip -dc "$CARRY/warm.gz" >"$BIN"
chmod +x "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuBLAS, cuRAND and NVRTC (CUDA 13) from the machine's Python packages; the binary opens
# them at run time.
LIB=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -path '*/site-packages/nvidia/cu13/lib' -type d -print 2>/dev/null | head -1 || true)
[ -n "$LIB" ] && export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries: ${LIB:-not found}"
M=${GPU_CHECK_MEMBERS:-4}
if [ ! -d "$WORK/member$((M - 1))" ]; then
  "$CARRY/synthetic_members" "$WORK" "$M" "${GPU_CHECK_HIDDEN:-2048}" "${GPU_CHECK_LAYERS:-16}" \
    "${GPU_CHECK_VOCAB:-128000}" bf16 >/dev/null
fi
MEMBERS=()
for i in $(seq 0 $((M - 1))); do MEMBERS+=(--members "$WORK/member$i"); done
DEMO=()
for d in models/minilm-sentiment-warm/member-*; do DEMO+=(--model "$d"); done
# The binary must also start where no GPU is usable: --device auto falls back to the CPU.
CUDA_VISIBLE_DEVICES="" timeout 60 "$BIN" inspect >/dev/null 2>&1 && echo "no-GPU start (inspect, CUDA_VISIBLE_DEVICES=''): ok"
"$BIN" gpu-check --fixtures tests/fixtures "${MEMBERS[@]}" "${DEMO[@]}"
