#!/usr/bin/env bash
# Failover test: bounded load through nginx in front of three warm replicas while one replica
# is killed (SIGKILL) and restarted, and another is stopped (SIGTERM: graceful drain) and
# restarted. Prints requests, failed requests and p50/p99 before and during the events; exits
# 1 if any client request failed.
#
#   bash docker/failover/failover-test.sh --compose   # the docker/compose.yaml topology (real containers)
#   bash docker/failover/failover-test.sh --native    # three `warm serve` + Debian's nginx on loopback
#
# Options: --duration S (default 60), --clients N (default 8), --out DIR (records, logs).
# --compose needs the images (docker compose -f docker/compose.yaml build, after
# docker/make-base-images.sh where no registry is reachable). --native needs a built warm
# (WARM_BIN, default target/release/warm, else target/debug/warm) and nginx
# (apt-get install nginx-light). Both serve the demo set unless WARM_MODEL is set.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MODE="" DURATION=60 CLIENTS=8 OUT="${TMPDIR:-/tmp}/warm-failover"
while [ $# -gt 0 ]; do
  case "$1" in
    --compose|--native) MODE="${1#--}" ;;
    --duration) DURATION="$2"; shift ;;
    --clients) CLIENTS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$MODE" ] || { echo "choose --compose or --native" >&2; exit 2; }
rm -rf "$OUT" && mkdir -p "$OUT"
EVENTS="$OUT/events.txt" RECORDS="$OUT/records.txt"
: >"$EVENTS"
T0=0
event() { echo "$(awk -v t0="$T0" -v now="$(date +%s.%N)" 'BEGIN{printf "%.1f", now-t0}') $*" >>"$EVENTS"; echo "[failover] $*" >&2; }
wait_http() { # url, seconds
  for _ in $(seq 1 $(( $2 * 5 ))); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "no answer from $1 within $2 s" >&2; return 1
}

# --- topology: start, kill, stop, start, teardown --------------------------------------------
if [ "$MODE" = compose ]; then
  PROJECT=warmfailover PORT="${WARM_PUBLISH_PORT:-18080}"
  if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi
  DC+=(-f "$ROOT/docker/compose.yaml" -p "$PROJECT")
  up() { WARM_PUBLISH_PORT="$PORT" "${DC[@]}" up -d --no-build "$@" >&2; }
  cid() { "${DC[@]}" ps -aq "warm-$1"; }
  start_replica() { docker start "$(cid "$1")" >/dev/null; }
  kill_replica() { docker kill "$(cid "$1")" >/dev/null; }
  stop_replica() { docker stop -t 30 "$(cid "$1")" >/dev/null; }
  teardown() { "${DC[@]}" logs --no-color >"$OUT/compose.log" 2>&1 || true; "${DC[@]}" down -t 5 >/dev/null 2>&1 || true; }
  trap teardown EXIT
  up
  for i in 1 2 3; do
    for _ in $(seq 1 300); do
      [ "$(docker inspect -f '{{.State.Health.Status}}' "$(cid "$i")")" = healthy ] && break
      sleep 0.5
    done
  done
else
  PORT=18080
  BIN="${WARM_BIN:-}"
  [ -n "$BIN" ] || for b in "$ROOT/target/release/warm" "$ROOT/target/debug/warm"; do [ -x "$b" ] && BIN="$b" && break; done
  [ -x "$BIN" ] || { echo "no warm binary (cargo build --release, or set WARM_BIN)" >&2; exit 1; }
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
  [ -x "$NGINX" ] || { echo "nginx is not installed (apt-get install nginx-light)" >&2; exit 1; }
  declare -A PIDS
  start_replica() {
    (cd "$ROOT" && exec "$BIN" serve --host 127.0.0.1 --port "1808$1" >>"$OUT/warm-$1.log" 2>&1) &
    PIDS[$1]=$!
  }
  kill_replica() { kill -KILL "${PIDS[$1]}"; wait "${PIDS[$1]}" 2>/dev/null || true; }
  stop_replica() { kill -TERM "${PIDS[$1]}"; wait "${PIDS[$1]}" 2>/dev/null || true; }
  teardown() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    [ -f "$OUT/nginx.pid" ] && kill -QUIT "$(cat "$OUT/nginx.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
  }
  trap teardown EXIT
  for i in 1 2 3; do start_replica "$i"; done
  sed -e "s#warm-\([123]\):8080#127.0.0.1:1808\1#" -e "s#listen 8080;#listen 127.0.0.1:$PORT;#" \
      -e "s#/tmp/nginx#$OUT/nginx#g" -e "s#^pid .*#pid $OUT/nginx.pid;#" \
      -e "s#^error_log .*#error_log $OUT/nginx-error.log warn;#" \
      "$ROOT/docker/nginx.conf" >"$OUT/nginx.conf"
  "$NGINX" -c "$OUT/nginx.conf" -p "$OUT" -e "$OUT/nginx-error.log"
  for i in 1 2 3; do wait_http "http://127.0.0.1:1808$i/health" 300; done
fi
wait_http "http://127.0.0.1:$PORT/health" 60

# --- load and events ---------------------------------------------------------------------------
PY="$(command -v python3)"
T0="$(date +%s.%N)"
"$PY" "$HERE/loadgen.py" "http://127.0.0.1:$PORT" "$CLIENTS" "$DURATION" "$RECORDS" &
LOAD=$!
at() { sleep "$(awk -v t0="$T0" -v at="$1" -v now="$(date +%s.%N)" 'BEGIN{d=t0+at-now; print (d>0?d:0)}')"; }
Q=$(awk -v d="$DURATION" 'BEGIN{print d/4}')
at "$Q";                                    event "kill -9 replica 1 (SIGKILL)"; kill_replica 1
at "$(awk -v q="$Q" 'BEGIN{print q*1.6}')"; event "restart replica 1";           start_replica 1
at "$(awk -v q="$Q" 'BEGIN{print q*2.2}')"; event "stop replica 2 (SIGTERM, drain)"; stop_replica 2
                                            event "replica 2 exited; restart replica 2"; start_replica 2
wait "$LOAD"
if [ "$MODE" = native ]; then
  echo "[failover] upstream errors nginx met (each retried elsewhere): $(grep -c 'upstream' "$OUT/nginx-error.log" || true)" >&2
else
  echo "[failover] upstream errors nginx met (each retried elsewhere): $("${DC[@]}" logs --no-color nginx 2>&1 | grep -c 'upstream' || true)" >&2
fi
"$PY" "$HERE/summarize.py" "$RECORDS" "$EVENTS" | tee "$OUT/summary.md"
