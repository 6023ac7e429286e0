#!/usr/bin/env bash
# Several warm builds against transformers on the same seeded pairs, interleaved in rounds
# so that a shared machine's drift hits every build alike. Each cell is one run of
# benches/pairs_vs_transformers.sh (warm over HTTP, transformers in process, same threads);
# the summary gives each build's best and median over the rounds.
#
#   bash benches/builds_vs_transformers.sh MODEL_DIR PAIRS ROUNDS LABEL=WARM_BIN...
#
# e.g. ... /tmp/warm-real/minilm-rm 512 3 before=/tmp/bins/warm-before after=target/release/warm
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
PAIRS=${2:?pairs}
ROUNDS=${3:?rounds}
shift 3
[ $# -gt 0 ] || { echo "give at least one LABEL=WARM_BIN" >&2; exit 2; }
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
echo "| round | build | warm, pairs/s | transformers, pairs/s | ratio | max \|score difference\| |"
echo "|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
  for spec in "$@"; do
    label=${spec%%=*}
    out=$(WARM_BIN=${spec#*=} bash benches/pairs_vs_transformers.sh "$MODEL" "$PAIRS" 2>/dev/null)
    warm=$(sed -n 's/^warm (HTTP.*: \([0-9.]*\) pairs\/s$/\1/p' <<<"$out")
    hf=$(sed -n 's/^transformers .*: \([0-9.]*\) pairs\/s$/\1/p' <<<"$out")
    ratio=$(sed -n 's/^warm \/ transformers: \([0-9.]*x\);.*/\1/p' <<<"$out")
    diff=$(sed -n 's/.*max |score difference| \([0-9.e+-]*\) over.*/\1/p' <<<"$out")
    echo "| $round | $label | $warm | $hf | $ratio | $diff |"
    echo "$label $warm $hf" >>"$RESULTS"
    BLAS=$(grep "^transformers' BLAS" <<<"$out" || true)
  done
done
echo
echo "| build | warm best | warm median | transformers median | median ratio |"
echo "|---|---|---|---|---|"
python3 - "$RESULTS" "$@" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for spec in sys.argv[2:]:
    label = spec.split("=", 1)[0]
    warm = [float(r[1]) for r in rows if r[0] == label]
    hf = [float(r[2]) for r in rows if r[0] == label]
    ratios = [w / h for w, h in zip(warm, hf)]
    print(f"| {label} | {max(warm):.1f} | {statistics.median(warm):.1f} | "
          f"{statistics.median(hf):.1f} | {statistics.median(ratios):.2f}x |")
PY
echo
echo "$BLAS"
