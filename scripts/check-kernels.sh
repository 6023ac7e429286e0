#!/usr/bin/env bash
# Compiles every kernels/*.cu to PTX and to sm_XX machine code (ptxas), so a broken
# kernel fails here, on a machine without a GPU. Prints each entry point's registers and
# spills. Needs nvcc (scripts/install-nvcc.sh).
#
#   bash scripts/check-kernels.sh [COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}]
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-${CUDA_COMPUTE_CAP:-90}}
NVCC=${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/}nvcc}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for cu in kernels/*.cu; do
  name=$(basename "$cu" .cu)
  "$NVCC" --ptx -O3 -std=c++17 -arch="sm_$CAP" -o "$OUT/$name.ptx" "$cu"
  "$NVCC" -cubin -O3 -std=c++17 -arch="sm_$CAP" -Xptxas -v -o "$OUT/$name.cubin" "$cu" 2>"$OUT/$name.log"
  if grep -q "[1-9][0-9]* bytes spill" "$OUT/$name.log"; then
    echo "$cu: register spills:" >&2; cat "$OUT/$name.log" >&2; exit 1
  fi
  entries=$(grep -c '^.visible .entry' "$OUT/$name.ptx")
  echo "$cu: PTX $(grep -m1 '^.version' "$OUT/$name.ptx" | cut -d' ' -f2) for sm_$CAP, $entries entry points," \
    "$(grep -o 'Used [0-9]* registers' "$OUT/$name.log" | tr '\n' ' ')"
done
