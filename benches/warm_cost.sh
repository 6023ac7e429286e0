#!/usr/bin/env bash
# The cost of WARM (design.md section 8): throughput of `warm serve` with M = 4 fused
# members against one member alone and against `--combine predictions` (ENS) with the same
# four, plus the HTTP overhead at low load against the bare forward pass. One machine; each
# server runs alone. The three servers take turns for ROUNDS rounds (a shared machine's
# drift then hits all three alike) and the summary gives each one's median.
#
#   bash benches/warm_cost.sh MODEL_DIR [REQUESTS=300] [CONCURRENCY=16] [PORT=18090] [ROUNDS=3]
#
# MODEL_DIR: an f32 HF reward model (e.g. /tmp/warm-real/minilm-rm); four members are made
# from it with seeded relative noise of 1% (examples/perturbed_members.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
REQUESTS=${2:-300}
CONC=${3:-16}
PORT=${4:-18090}
ROUNDS=${5:-3}
WORK=${WARM_BENCH_DIR:-/tmp/warm-cost}
cargo build --release --quiet --bin warm --example load --example perturbed_members --example forward_throughput
[ -d "$WORK/member3" ] || target/release/examples/perturbed_members "$MODEL" "$WORK" 4 0.01
M=(--model "$WORK/member0" --model "$WORK/member1" --model "$WORK/member2" --model "$WORK/member3")
rm -f "$WORK"/round-*.txt

run() { # round, label, serve args...
  local round=$1 label=$2; shift 2
  target/release/warm serve "$@" --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  target/release/examples/load "http://127.0.0.1:$PORT" 4 40 1 1 >/dev/null # warm-up
  echo "### round $round, $label" >&2
  target/release/examples/load "http://127.0.0.1:$PORT" "$CONC" "$REQUESTS" 1 7 | tee "$WORK/round-$round-$label.txt" >&2
  if [ "$label" = single ]; then
    target/release/examples/load "http://127.0.0.1:$PORT" 1 100 1 7 | tee "$WORK/round-$round-low-load.txt" >&2
  fi
  kill -TERM $pid; wait $pid || true
  if [ "$label" = single ]; then
    # The bare forward pass right after the low-load run, so that a shared machine's drift
    # between rounds hits both sides alike: one sequence as long as the low-load requests'
    # mean (tokens/s over inputs/s; the seeded requests are the same every round).
    TOKENS=$(python3 - "$WORK/round-$round-low-load.txt" <<'PY'
import sys
row = [l for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| concurrency")][0]
cells = [c.strip() for c in row.strip().strip("|").split("|")]
print(round(float(cells[4]) / float(cells[3])))
PY
)
    target/release/examples/forward_throughput "$WORK/member0" 1 "$TOKENS" 50 >"$WORK/round-$round-forward.txt"
  fi
}
for round in $(seq 1 "$ROUNDS"); do
  run "$round" warm "${M[@]}"
  run "$round" single --model "$WORK/member0"
  run "$round" ens "${M[@]}" --combine predictions
done
python3 - "$WORK" "$ROUNDS" "$TOKENS" <<'PY'
import re, statistics, sys
work, rounds, tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def cells(name):
    line = [l for l in open(f"{work}/{name}.txt") if l.startswith("| ") and not l.startswith("| concurrency")][0]
    return [c.strip() for c in line.strip().strip("|").split("|")]
servers = [("warm", "WARM, M = 4 fused"), ("single", "one member"), ("ens", "ENS, M = 4 predictions")]
rps = {s: [float(cells(f"round-{r}-{s}")[2]) for r in range(1, rounds + 1)] for s, _ in servers}
print("| server | requests/s per round | median | p50 ms (round 1) | p99 ms (round 1) |")
print("|---|---|---|---|---|")
for s, name in servers:
    c = cells(f"round-1-{s}")
    print(f"| {name} | {', '.join(f'{x:.1f}' for x in rps[s])} | {statistics.median(rps[s]):.1f} | {c[5]} | {c[7]} |")
ratio = lambda a, b: [x / y for x, y in zip(rps[a], rps[b])]
single, ens = ratio("warm", "single"), ratio("warm", "ens")
print(f"\nWARM / one member per round: {', '.join(f'{x:.2f}' for x in single)}; median {statistics.median(single):.2f}x (target >= 0.95)")
print(f"WARM / ENS per round: {', '.join(f'{x:.2f}' for x in ens)}; median {statistics.median(ens):.2f}x (target >= 3.5)")
p50 = [float(cells(f"round-{r}-low-load")[5]) for r in range(1, rounds + 1)]
outside = [float(cells(f"round-{r}-low-load")[9]) for r in range(1, rounds + 1)]
fwd = [float(re.search(r"([0-9.]+) ms/batch", open(f"{work}/round-{r}-forward.txt").read()).group(1)) for r in range(1, rounds + 1)]
print(f"HTTP overhead at low load, medians over the rounds: p50 of one-pair requests {statistics.median(p50):.1f} ms "
      f"vs bare forward of 1 x {tokens} tokens {statistics.median(fwd):.1f} ms: {statistics.median(p50) - statistics.median(fwd):+.1f} ms (target <= 2 ms)")
print(f"  per request, latency less the server's x-inference-time: p50 {statistics.median(outside):.2f} ms "
      f"(per round {', '.join(f'{x:.2f}' for x in outside)})")
PY
