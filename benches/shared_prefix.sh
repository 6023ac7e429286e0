#!/usr/bin/env bash
# Shared prompts computed once (--min-shared-prefix): `warm serve` of one decoder reward
# model with sharing on (the default) and off (0), and optionally an older binary, taking
# turns for ROUNDS rounds. Two workloads per server: best-of-N (each request one
# /v1/rerank of a PROMPT_WORDS-word prompt with N responses) and the plain pair workload
# of benches/warm_cost.sh (inputs that share little), to show what sharing costs where
# there is nothing to share.
#
#   bash benches/shared_prefix.sh MODEL_DIR [REQUESTS=60] [CONCURRENCY=4] [N=8] [PROMPT_WORDS=300] [ROUNDS=3] [PORT=18095]
#
# WARM_BEFORE_BIN=path adds that binary (e.g. one built before sharing existed) as a third
# server, run without the flag. WARM_SERVE_ARGS adds arguments to every server (e.g.
# `--dtype bf16`: the padded layout, as on a GPU); WARM_BENCH_WARMUP sets the best-of-N
# requests each server gets first (default 8). WARM_BENCH_SERVERS picks this build's servers
# (default "shared apart"; "shared" alone with WARM_BEFORE_BIN compares two builds without
# the slow server that shares nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
REQUESTS=${2:-60}
CONC=${3:-4}
N=${4:-8}
WORDS=${5:-300}
ROUNDS=${6:-3}
PORT=${7:-18095}
WORK=${WARM_BENCH_DIR:-/tmp/warm-shared-prefix}
mkdir -p "$WORK"
rm -f "$WORK"/round-*.txt
cargo build --release --quiet --bin warm --example load
BIN=target/release/warm

run() { # round, label, binary, serve args...
  local round=$1 label=$2 bin=$3; shift 3
  # shellcheck disable=SC2086
  "$bin" serve --model "$MODEL" ${WARM_SERVE_ARGS:-} "$@" --host 127.0.0.1 --port "$PORT" >"$WORK/serve-$label.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
  target/release/examples/load "http://127.0.0.1:$PORT" 2 "${WARM_BENCH_WARMUP:-8}" "$N" 3 "$WORDS" >/dev/null # warm-up
  echo "### round $round, $label" >&2
  target/release/examples/load "http://127.0.0.1:$PORT" "$CONC" "$REQUESTS" "$N" 7 "$WORDS" | tee "$WORK/round-$round-$label-best.txt" >&2
  target/release/examples/load "http://127.0.0.1:$PORT" "$CONC" "$((REQUESTS * 4))" 1 7 | tee "$WORK/round-$round-$label-pairs.txt" >&2
  curl -s "http://127.0.0.1:$PORT/metrics" | grep '^warm_shared_prefix_tokens_total' >"$WORK/round-$round-$label-shared.txt" || true
  kill -TERM $pid; wait $pid || true
}
SERVERS=${WARM_BENCH_SERVERS:-shared apart}
for s in $SERVERS; do
  case $s in shared | apart) ;; *) echo "WARM_BENCH_SERVERS: unknown server '$s' (shared, apart)" >&2; exit 2 ;; esac
done
[[ " $SERVERS " == *" shared "* ]] || { echo "WARM_BENCH_SERVERS must include shared (the ratios are against it)" >&2; exit 2; }
[ -z "${WARM_BEFORE_BIN:-}" ] || SERVERS="$SERVERS before"
for round in $(seq 1 "$ROUNDS"); do
  for s in $SERVERS; do
    case $s in
      shared) run "$round" shared "$BIN" ;;
      apart) run "$round" apart "$BIN" --min-shared-prefix 0 ;;
      before) run "$round" before "$WARM_BEFORE_BIN" ;;
    esac
  done
done
python3 - "$WORK" "$ROUNDS" "$SERVERS" "$N" "$WORDS" <<'PY'
import statistics, sys
work, rounds, servers, n, words = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4], sys.argv[5]
def cells(name):
    line = [l for l in open(f"{work}/{name}.txt") if l.startswith("| ") and not l.startswith("| concurrency")][0]
    return [c.strip() for c in line.strip().strip("|").split("|")]
# Input tokens per second (the server's usage counts): the same workload on every server,
# so their ratio is the throughput ratio, with more digits than requests/s.
print(f"| server | best-of-{n} ({words}-word prompt) input tokens/s per round | median | p50 ms (round 1) | pairs input tokens/s per round | median |")
print("|---|---|---|---|---|---|")
med = {}
for s in servers:
    best = [float(cells(f"round-{r}-{s}-best")[4]) for r in range(1, rounds + 1)]
    pairs = [float(cells(f"round-{r}-{s}-pairs")[4]) for r in range(1, rounds + 1)]
    med[s] = (statistics.median(best), statistics.median(pairs))
    errors = sum(int(cells(f"round-{r}-{s}-{w}")[8]) for r in range(1, rounds + 1) for w in ("best", "pairs"))
    assert errors == 0, f"{s}: {errors} failed requests"
    print(f"| {s} | {', '.join(f'{x:.0f}' for x in best)} | {med[s][0]:.0f} | {cells(f'round-1-{s}-best')[5]} | "
          f"{', '.join(f'{x:.0f}' for x in pairs)} | {med[s][1]:.0f} |")
for other in [s for s in servers if s != "shared"]:
    print(f"\nshared / {other}: best-of-{n} {med['shared'][0] / med[other][0]:.2f}x, pairs {med['shared'][1] / med[other][1]:.2f}x")
print("\ntokens not computed (shared server, per round):",
      ", ".join(open(f"{work}/round-{r}-shared-shared.txt").read().split()[-1] for r in range(1, rounds + 1)))
PY
