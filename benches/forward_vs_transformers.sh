#!/usr/bin/env bash
# Forward throughput of one reward model in warm and in Hugging Face transformers (torch
# CPU), same thread count, same shapes, in one run:
#
#   bash benches/forward_vs_transformers.sh MODEL_DIR [BATCH] [SEQ_LEN] [ITERS] [THREADS]
#
# MODEL_DIR is an HF checkpoint (e.g. /tmp/warm-real/minilm-rm from
# scripts/make_real_checkpoints.py). Needs the reference environment of design.md
# section 9 at $WARM_REF_ENV (default /tmp/warm-ref/env; build it with
# ../shared/tools/ref-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
BATCH=${2:-32}
SEQ=${3:-128}
ITERS=${4:-10}
THREADS=${5:-$(nproc)}
REF=${WARM_REF_ENV:-/tmp/warm-ref/env}
# shellcheck source=benches/openblas_core.sh
source benches/openblas_core.sh
cargo build --release --quiet --example forward_throughput
WARM_LINE=$(CANDLE_NUM_THREADS=$THREADS RAYON_NUM_THREADS=$THREADS target/release/examples/forward_throughput "$MODEL" "$BATCH" "$SEQ" "$ITERS")
echo "$WARM_LINE"
# shellcheck disable=SC1091
TF_LINE=$(source "$REF/env.sh" && OMP_NUM_THREADS=$THREADS python3 - "$MODEL" "$BATCH" "$SEQ" "$ITERS" "$THREADS" <<'PY'
import sys, time, torch
from transformers import AutoModelForSequenceClassification
model_dir, batch, seq, iters, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
state = 0x2545F4914F6CDD1D
ids = []
for _ in range(batch * seq):
    state ^= (state << 13) & 0xFFFFFFFFFFFFFFFF
    state ^= state >> 7
    state ^= (state << 17) & 0xFFFFFFFFFFFFFFFF
    ids.append(1000 + state % 20000)
ids = torch.tensor(ids).reshape(batch, seq)
mask = torch.ones_like(ids)
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
    start = time.perf_counter()
    for _ in range(iters):
        model(input_ids=ids, attention_mask=mask)
    secs = time.perf_counter() - start
print(f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, {threads} threads): "
      f"batch {batch} x {seq}: {secs * 1000 / iters:.1f} ms/batch, {batch * seq * iters / secs:.0f} tokens/s")
PY
)
echo "$TF_LINE"
python3 - "$WARM_LINE" "$TF_LINE" <<'PY'
import re, sys
w, t = (float(re.search(r"([0-9.]+) tokens/s", s).group(1)) for s in sys.argv[1:])
print(f"warm / transformers throughput: {w / t:.2f}x")
PY
