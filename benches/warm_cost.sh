#!/usr/bin/env bash
# The cost of WARM (design.md section 8): throughput of `warm serve` with M = 4 fused
# members against one member alone and against `--combine predictions` (ENS) with the same
# four, plus the HTTP overhead at low load against the bare forward pass. One run, one
# machine; each server runs alone.
#
#   bash benches/warm_cost.sh MODEL_DIR [REQUESTS=300] [CONCURRENCY=16] [PORT=18090]
#
# MODEL_DIR: an f32 HF reward model (e.g. /tmp/warm-real/minilm-rm); four members are made
# from it with seeded relative noise of 1% (examples/perturbed_members.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
REQUESTS=${2:-300}
CONC=${3:-16}
PORT=${4:-18090}
WORK=${WARM_BENCH_DIR:-/tmp/warm-cost}
cargo build --release --quiet --bin warm --example load --example perturbed_members --example forward_throughput
[ -d "$WORK/member3" ] || target/release/examples/perturbed_members "$MODEL" "$WORK" 4 0.01
M=(--model "$WORK/member0" --model "$WORK/member1" --model "$WORK/member2" --model "$WORK/member3")

run() { # label, serve args...
  local label=$1; shift
  target/release/warm serve "$@" --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  target/release/examples/load "http://127.0.0.1:$PORT" 4 40 1 1 >/dev/null # warm-up
  echo "### $label" >&2
  target/release/examples/load "http://127.0.0.1:$PORT" "$CONC" "$REQUESTS" 1 7 | tee "$WORK/$label.txt" >&2
  if [ "$label" = single ]; then
    target/release/examples/load "http://127.0.0.1:$PORT" 1 100 1 7 | tee "$WORK/low-load.txt" >&2
  fi
  kill -TERM $pid; wait $pid || true
}
run warm "${M[@]}"
run single --model "$WORK/member0"
run ens "${M[@]}" --combine predictions
# The bare forward pass of one sequence as long as the low-load requests' mean (tokens/s
# over inputs/s of that run), so both sides do the same work.
TOKENS=$(python3 - "$WORK/low-load.txt" <<'PY'
import sys
row = [l for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| concurrency")][0]
cells = [c.strip() for c in row.strip().strip("|").split("|")]
print(round(float(cells[4]) / float(cells[3])))
PY
)
FORWARD=$(target/release/examples/forward_throughput "$WORK/member0" 1 "$TOKENS" 50)
python3 - "$WORK" "$FORWARD" "$TOKENS" <<'PY'
import sys, re
work, forward, tokens = sys.argv[1], sys.argv[2], sys.argv[3]
def row(name):
    line = [l for l in open(f"{work}/{name}.txt") if l.startswith("| ") and not l.startswith("| concurrency")][0]
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return float(cells[2]), cells
warm, wc = row("warm"); single, sc = row("single"); ens, ec = row("ens")
print("| server | requests/s | p50 ms | p99 ms |")
print("|---|---|---|---|")
for name, (rps, cells) in [("WARM, M = 4 fused", (warm, wc)), ("one member", (single, sc)), ("ENS, M = 4 predictions", (ens, ec))]:
    print(f"| {name} | {rps:.1f} | {cells[5]} | {cells[7]} |")
print(f"\nWARM / one member: {warm / single:.2f}x (target >= 0.95); WARM / ENS: {warm / ens:.2f}x (target >= 3.5)")
low = [l for l in open(f"{work}/low-load.txt") if l.startswith("| ") and not l.startswith("| concurrency")][0]
p50 = float([c.strip() for c in low.strip().strip("|").split("|")][5])
ms = float(re.search(r"([0-9.]+) ms/batch", forward).group(1))
print(f"HTTP overhead at low load: p50 of one-pair requests {p50:.1f} ms vs bare forward of 1 x {tokens} tokens {ms:.1f} ms: +{p50 - ms:.1f} ms (target <= 2 ms)")
PY
