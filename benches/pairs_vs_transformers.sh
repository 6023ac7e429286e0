#!/usr/bin/env bash
# Scores the same seeded prompt/response pairs with warm (the HTTP server, batches of 32
# inputs per request) and with Hugging Face transformers (torch CPU, batches of 32 sorted by
# length), same thread count, in one run; prints throughput of each, the ratio, and the
# largest score difference.
#
#   bash benches/pairs_vs_transformers.sh MODEL_DIR [PAIRS=512] [THREADS=2] [PORT=18095]
#
# WARM_BIN=path uses that warm binary instead of building target/release/warm (to compare
# two builds against the same transformers run conditions).
# Needs the reference environment of design.md section 9 at $WARM_REF_ENV.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?model dir}
PAIRS=${2:-512}
THREADS=${3:-$(nproc)}
PORT=${4:-18095}
REF=${WARM_REF_ENV:-/tmp/warm-ref/env}
# shellcheck source=benches/openblas_core.sh
source benches/openblas_core.sh
WORK=$(mktemp -d)
WARM_BIN=${WARM_BIN:-}
if [ -z "$WARM_BIN" ]; then
  cargo build --release --quiet --bin warm
  WARM_BIN=target/release/warm
fi
python3 - "$PAIRS" >"$WORK/pairs.json" <<'PY'
import json, random, sys
rng = random.Random(7)
subjects = ["France", "Japan", "Kenya", "Peru", "Canada", "Italy", "Egypt", "Norway"]
words = "the answer is because first we compute then check result carefully so it follows that value equals clearly and therefore".split()
pairs = []
for _ in range(int(sys.argv[1])):
    a, b, s = rng.randrange(100), rng.randrange(100), rng.choice(subjects)
    pairs.append({"prompt": f"What is {a} + {b}, and what is the capital of {s}?",
                  "response": f"{a + b} " + " ".join(rng.choice(words) for _ in range(rng.randrange(5, 65)))})
print(json.dumps(pairs))
PY
RAYON_NUM_THREADS=$THREADS "$WARM_BIN" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" >"$WORK/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
# shellcheck disable=SC1091
source "$REF/env.sh"
OMP_NUM_THREADS=$THREADS python3 - "$MODEL" "$WORK/pairs.json" "$PORT" "$THREADS" <<'PY'
import json, sys, time, urllib.request
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_dir, pairs_path, port, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pairs = json.load(open(pairs_path))
def post(body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/score", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
post({"inputs": pairs[:8]})  # warm-up
start = time.perf_counter()
warm_scores = []
for i in range(0, len(pairs), 32):
    warm_scores += post({"inputs": pairs[i:i + 32]})["scores"]
warm_s = time.perf_counter() - start

torch.set_num_threads(threads)
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
def encode(p):
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}], tokenize=False)
        return tok(text, add_special_tokens=False)
    return tok(p["prompt"], p["response"])
with torch.no_grad():
    encoded = [encode(p) for p in pairs]
    model(**tok.pad([encoded[0]], return_tensors="pt"))  # warm-up
    start = time.perf_counter()
    encoded = [encode(p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: len(encoded[i]["input_ids"]))
    hf_scores = [0.0] * len(pairs)
    for i in range(0, len(order), 32):
        idx = order[i:i + 32]
        batch = tok.pad([encoded[j] for j in idx], return_tensors="pt")
        logits = model(**batch).logits[:, 0]
        for j, v in zip(idx, logits.tolist()):
            hf_scores[j] = v
    hf_s = time.perf_counter() - start
diff = max(abs(a - b) for a, b in zip(warm_scores, hf_scores))
print(f"warm (HTTP, 32 pairs per request): {len(pairs) / warm_s:.1f} pairs/s")
print(f"transformers {__import__('transformers').__version__} (in process, batches of 32 by length): {len(pairs) / hf_s:.1f} pairs/s")
print(f"warm / transformers: {hf_s / warm_s:.2f}x; max |score difference| {diff:.2e} over {len(pairs)} pairs")
PY
