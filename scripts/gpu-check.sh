#!/usr/bin/env bash
# One script for a lent GPU machine: builds nothing, runs every GPU check of warm and
# prints one table (kernels vs CPU references, kernel bandwidth vs a device copy, fusion of
# a multi-GB set on the device vs reading it and PCIe, device vs CPU fusion, GPU vs CPU
# scores on the parity fixtures, scoring throughput of the demo WARM set and of a
# Llama-shaped 1.07B set, `warm fuse --device cuda` against PyTorch, `warm serve` over
# HTTP on the GPU and without one).
# With $OUT set (the device tool), the whole log is written to $OUT/gpu-check.log.
#
# Here (no GPU):   bash scripts/build-cuda.sh && bash scripts/gpu-check.sh --prepare
#                  (strips the binaries into target/gpu-carry/, under the 64 MiB carry limit)
# There:           bash scripts/gpu-check.sh          (device tool: carry target/gpu-carry)
#
# Options: GPU_CHECK_MEMBERS (default 4), GPU_CHECK_HIDDEN/LAYERS/VOCAB (default
# 2048/16/128000: 1.07B parameters, 2.1 GB per bf16 member), GPU_CHECK_WORK (default
# /tmp/warm-gpu-check).
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
  gzip -9 "$CARRY/synthetic_members"
  du -sh "$CARRY"/*
  # What travels: tracked and untracked-not-ignored files, and the carry (limit 64 MiB).
  bytes() { xargs -0 -r stat -c %s | awk '{n += $1} END {print n + 0}'; }
  tree=$(git ls-files -z | bytes)
  loose=$(git ls-files -z --others --exclude-standard | bytes)
  carried=$(find "$CARRY" -type f -print0 | bytes)
  total=$((tree + loose + carried))
  echo "travels: tree $tree + untracked $loose + carry $carried = $total bytes of 67108864"
  [ "$total" -le 67108864 ] || { echo "over the device tool's 64 MiB: remove untracked files or carry less" >&2; exit 1; }
  exit 0
fi
WORK=${GPU_CHECK_WORK:-/tmp/warm-gpu-check}
export GPU_CHECK_WORK=$WORK
mkdir -p "$WORK"
# Logs are written where the device tool returns files from as they grow, so a run cut
# off by its time limit still brings them back.
export GPU_CHECK_LOGS=${OUT:-$WORK}
if [ -n "${OUT:-}" ] && [ -z "${GPU_CHECK_LOGGING:-}" ]; then
  GPU_CHECK_LOGGING=1 bash "$0" "$@" 2>&1 | tee "$OUT/gpu-check.log"
  exit "${PIPESTATUS[0]}"
fi
[ -f "$CARRY/warm.gz" ] || { echo "no $CARRY/warm.gz: run 'bash scripts/gpu-check.sh --prepare' on the build machine and carry $CARRY" >&2; exit 2; }
BIN=$WORK/warm
gzip -dc "$CARRY/warm.gz" >"$BIN"
gzip -dc "$CARRY/synthetic_members.gz" >"$WORK/synthetic_members"
chmod +x "$BIN" "$WORK/synthetic_members"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuBLAS, cuRAND and NVRTC (CUDA 13) from the machine's Python packages; the binary opens
# them at run time.
LIB=""
# Where pip put NVIDIA's packages (quick), else the whole file system.
ROOTS=$(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null || true)
for name in 'libcublas.so.13*' 'libcublasLt.so.13*' 'libcurand.so.10*'; do
  found=""
  # shellcheck disable=SC2086
  [ -z "$ROOTS" ] || found=$(find $ROOTS -name "$name" 2>/dev/null | head -1 || true)
  [ -n "$found" ] || found=$(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o -name "$name" -print 2>/dev/null | head -1 || true)
  [ -z "$found" ] || case ":$LIB:" in *":$(dirname "$found"):"*) ;; *) LIB=${LIB:+$LIB:}$(dirname "$found") ;; esac
done
[ -z "$LIB" ] || export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "CUDA libraries (cuBLAS 13, cuRAND 10): ${LIB:-not found}"
M=${GPU_CHECK_MEMBERS:-4}
status=0
# The last member's tokenizer, copied after every member is written, marks a whole set (a
# run cut off while generating leaves a partial one, made again here).
make_members() {
  "$WORK/synthetic_members" "$WORK" "$M" "${GPU_CHECK_HIDDEN:-2048}" "${GPU_CHECK_LAYERS:-16}" \
    "${GPU_CHECK_VOCAB:-128000}" bf16 >/dev/null || return 1
  # A tokenizer makes the synthetic set servable for the throughput row (scores are
  # meaningless, the ids are drawn below the fixture's vocabulary anyway).
  for i in $(seq 0 $((M - 1))); do
    cp tests/fixtures/models/llama/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$WORK/member$i/" || return 1
  done
}
MEMBERS=()
if [ -f "$WORK/member$((M - 1))/tokenizer.json" ] || make_members; then
  for i in $(seq 0 $((M - 1))); do MEMBERS+=(--members "$WORK/member$i"); done
else
  # The rest of the table does not need the set: report and go on.
  status=1
  echo "| synthetic set | $M members | ERROR | generating it in $WORK failed (df: $(df -h "$WORK" | awk 'NR==2 {print $4}') free) |"
fi
DEMO=()
for d in models/minilm-sentiment-warm/member-*; do DEMO+=(--model "$d"); done
# The table on stdout; fusion progress and logs on stderr, kept apart (tail shown on failure).
# Each step has its own time limit, so a hang costs that step, not the whole device call.
# Limits: 200 + 80 + 100 s, with the set's generation under the device call's 480 s.
timeout 200 "$BIN" gpu-check --fixtures tests/fixtures "${MEMBERS[@]}" "${DEMO[@]}" 2>"$GPU_CHECK_LOGS/gpu-check.stderr" || {
  status=1
  echo "warm gpu-check failed; the end of its stderr:"
  tail -n 20 "$GPU_CHECK_LOGS/gpu-check.stderr"
}
# `warm fuse --device cuda` (the fused tensors streamed back and written) against a
# weighted average in PyTorch, loaded back by transformers (both are on the machine).
timeout 80 python3 scripts/check_fuse_with_transformers.py "$BIN" --device cuda || status=1
# `warm serve` over HTTP: on the GPU, and where no GPU is usable (falls back to the CPU).
timeout 100 python3 scripts/gpu-serve-check.py "$BIN" || status=1
echo "gpu-check: $([ $status = 0 ] && echo all passed || echo FAILURES above)"
exit $status
