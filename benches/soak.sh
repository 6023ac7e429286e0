#!/usr/bin/env bash
# A bounded soak of `warm serve` on loopback with wrk: one prompt/response pair per request
# at a fixed concurrency; prints requests/s, latency percentiles, errors and the server's
# RSS at start, every RSS_EVERY seconds during the run (default 30), with the heap's bytes
# in use and freed bytes kept for reuse from /metrics (a leak shows as bytes in use that
# keep rising; the allocator's cache as free bytes), and at the end.
#
#   bash benches/soak.sh MODEL_DIR [SECONDS=180] [CONNECTIONS=16] [PORT=18080]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
SECONDS_TOTAL=${2:-180}
CONNS=${3:-16}
PORT=${4:-18080}
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --bin warm
target/release/warm serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" >/tmp/warm-soak.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 0.1
done
rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$PID/status"; }
LUA=$(mktemp --suffix .lua)
cat >"$LUA" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs": [{"prompt": "What is the capital of France?", "response": "The capital of France is Paris, a city on the Seine known for the Louvre and the Eiffel Tower."}]}'
done = function(summary, latency, requests)
  io.write(string.format("p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  io.write(string.format("non-2xx or socket errors: %d\n",
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
echo "RSS at start: $(rss)"
# Warm-up, then the measured run, its RSS sampled alongside.
wrk -t 2 -c "$CONNS" -d 5s -s "$LUA" "http://127.0.0.1:$PORT/v1/score" >/dev/null
EVERY=${RSS_EVERY:-30}
RSS_LOG=$(mktemp)
(
  elapsed=0
  while sleep "$EVERY"; do
    elapsed=$((elapsed + EVERY))
    [ "$elapsed" -lt "$SECONDS_TOTAL" ] || break
    heap=$(curl -s "http://127.0.0.1:$PORT/metrics" |
      awk '/^warm_heap_(in_use|free)_bytes / {printf " %s %d kB", $1, $2 / 1024}')
    echo "RSS at ${elapsed}s: $(rss);$heap" >>"$RSS_LOG"
  done
) &
SAMPLER=$!
trap 'kill $PID $SAMPLER 2>/dev/null || true; rm -f "$LUA" "$RSS_LOG"' EXIT
wrk -t 2 -c "$CONNS" -d "${SECONDS_TOTAL}s" --timeout 30s -s "$LUA" "http://127.0.0.1:$PORT/v1/score"
kill "$SAMPLER" 2>/dev/null || true
cat "$RSS_LOG"
echo "RSS at end: $(rss)"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^warm_requests_total|^warm_batch_size_(sum|count)'
