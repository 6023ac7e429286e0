#!/usr/bin/env bash
# Runs the CUDA kernels' source (kernels/*.cu) on the CPU through a small emulation of
# CUDA's execution model (tests/cuda_emulation/) and checks them against plain references.
# Needs g++ 12 or newer (C++20 barriers, _Float16); no CUDA toolkit, no GPU. What it shows
# and what only a GPU can: tests/cuda_emulation/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-std=c++20 -O2 -pthread -Wall -Wno-unknown-pragmas -Werror -Itests/cuda_emulation/include)
for cu in kernels/*.cu; do
  g++ "${FLAGS[@]}" -include cuda_shim.h -x c++ -c "$cu" -o "$OUT/$(basename "$cu" .cu).o"
done
g++ "${FLAGS[@]}" tests/cuda_emulation/main.cpp "$OUT"/*.o -o "$OUT/emulate"
"$OUT/emulate"
