#!/usr/bin/env bash
# Fuzzes every route of the OpenAPI document with schemathesis against a running warm: bodies
# drawn from the document must be answered (never a 5xx, never a reset), in the documented
# statuses and shapes; bodies it forbids must be refused. One server per fixture: a decoder
# with a chat template (llama), an encoder without one (bert), a process reward model
# (qwen2-prm). The seed is fixed, so a run is repeatable.
#
#   bash scripts/fuzz-api.sh [EXAMPLES_PER_ROUTE=100]
#
# Needs a built warm (WARM_BIN, default target/debug/warm) and Python 3 (schemathesis is
# installed into $FUZZ_VENV, default /tmp/warm-fuzz-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES=${1:-100}
BIN=${WARM_BIN:-target/debug/warm}
VENV=${FUZZ_VENV:-/tmp/warm-fuzz-venv}
SEED=${FUZZ_SEED:-20261207}
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet schemathesis==4.32.5
fi
OUT=$(mktemp -d)
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$OUT"' EXIT
status=0
port=18391
for fixture in llama bert qwen2-prm; do
  "$BIN" serve --model "tests/fixtures/models/$fixture" --host 127.0.0.1 --port "$port" \
    >"$OUT/$fixture.log" 2>&1 &
  PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    sleep 0.2
  done
  echo "== $fixture: $EXAMPLES examples per route, seed $SEED"
  if ! (cd scripts/fuzz && "$VENV/bin/schemathesis" run "http://127.0.0.1:$port/openapi.json" \
      --checks all --max-examples "$EXAMPLES" --seed "$SEED" --no-color >"$OUT/$fixture.txt" 2>&1); then
    status=1
    grep -E "^___|^- |Invalid component|curl " "$OUT/$fixture.txt" | cut -c1-400 || true
  fi
  grep -E "^  [0-9]+ generated" "$OUT/$fixture.txt" || tail -5 "$OUT/$fixture.txt"
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "$fixture: the server exited" >&2; tail -20 "$OUT/$fixture.log" >&2; status=1
  elif grep -q "panicked" "$OUT/$fixture.log"; then
    echo "$fixture: the server panicked" >&2; grep -m3 -A3 "panicked" "$OUT/$fixture.log" >&2; status=1
  fi
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  port=$((port + 1))
done
exit "$status"
