#!/usr/bin/env bash
# Fusion benchmark (design.md section 8): `warm fuse` of M synthetic members against the
# time to read the member files once from a warm page cache plus writing one model, and
# peak RSS against one member's size.
#
#   bash benches/fuse_bench.sh [WORK_DIR] [DTYPE]      (default /tmp/warm-fuse-bench f32)
#
# Members: 4 x Llama-shaped, hidden 768, 12 layers, vocab 52000 (125M parameters: about
# 500 MB each in f32, 250 MB in bf16). WARM_BIN=path times that warm binary instead;
# WARM_FUSE_MEMBERS=M fuses M members (give each count a WORK_DIR of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/warm-fuse-bench}
DTYPE=${2:-f32}
M=${WARM_FUSE_MEMBERS:-4}
cargo build --release --quiet --bin warm --example synthetic_members
WARM=${WARM_BIN:-target/release/warm}
SET="$WORK/$DTYPE"
if [ ! -d "$SET/member$((M - 1))" ]; then
  target/release/examples/synthetic_members "$SET" "$M" 768 12 52000 "$DTYPE"
fi
FILES=$(ls "$SET"/member*/model.safetensors)
MEMBER_BYTES=$(stat -c %s "$SET/member0/model.safetensors")
OUT="$WORK/out-$DTYPE"
rm -rf "$OUT"; mkdir -p "$OUT"

# Wall seconds to the millisecond (bash's `time`; /usr/bin/time rounds to 10 ms, which is a
# third of the read time on a fast machine).
TIMEFORMAT=%3R
secs() { { time "$@" >/dev/null 2>&1; } 2>&1 | tail -1; }
# Warm the page cache, then time the baseline pieces and the fusion five times each and
# keep the best.
cat $FILES >/dev/null
best() { sort -n | head -1; }
READ=$(for _ in 1 2 3 4 5; do secs cat $FILES; done | best)
WRITE=$(for _ in 1 2 3 4 5; do secs cp "$SET/member0/model.safetensors" "$OUT/copy.safetensors"; rm -f "$OUT/copy.safetensors"; done | best)
RUNS=()
for _ in 1 2 3 4 5; do
  rm -rf "$OUT/fused"
  args=()
  for d in "$SET"/member*; do args+=(--model "$d"); done
  WALL=$( { time /usr/bin/time -f "%M" -o "$WORK/rss.txt" "$WARM" fuse "${args[@]}" --output "$OUT/fused" >"$WORK/fuse.log" 2>&1; } 2>&1 | tail -1)
  RUNS+=("$WALL $(cat "$WORK/rss.txt")")
done
FUSE=$(printf '%s\n' "${RUNS[@]}" | sort -n | head -1)
FUSE_S=${FUSE% *}; RSS_KB=${FUSE#* }
python3 - "$M" "$MEMBER_BYTES" "$READ" "$WRITE" "$FUSE_S" "$RSS_KB" "$DTYPE" <<'PY'
import sys
m, member, read, write, fuse, rss_kb, dtype = sys.argv[1:]
m, member, read, write, fuse, rss = int(m), int(member), float(read), float(write), float(fuse), int(rss_kb) * 1024
base = read + write
print(f"| dtype | members | member size | cat members (s) | write one model (s) | warm fuse (s) | fuse / (read + write) | peak RSS | RSS / member |")
print(f"|---|---|---|---|---|---|---|---|---|")
print(f"| {dtype} | {m} | {member/1e6:.0f} MB | {read:.3f} | {write:.3f} | {fuse:.3f} | {fuse/base:.2f}x | {rss/1e6:.0f} MB | {rss/member:.2f} |")
PY
tail -1 "$WORK/fuse.log"
