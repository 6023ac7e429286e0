"""A DeBERTa-v3-base-sized reward model with random weights, and what transformers computes
with it: parity at full size (12 layers, 768 wide, 256 log buckets over 512 positions, inputs
up to 500 tokens, so distances reach the log range the tiny fixtures never do) and a model
for benchmarks (`WARM_BENCH_MODEL`). No DeBERTa weights can be downloaded here; the shapes
and settings are deberta-v3-base's, the vocabulary is 32000 (the bench draws ids below 20005)
and the tokenizer is the deberta-v2 fixture's (481 pieces).

    source /tmp/warm-ref/env/env.sh && python3 scripts/make_deberta_base.py /tmp/warm-deberta
    WARM_REAL_MODELS=/tmp/warm-deberta cargo test --release --test parity -- --ignored

Writes OUT/deberta-v3-base-random/ (config.json, model.safetensors 0.44 GB, tokenizer files,
expected.json in make_real_checkpoints.py's format). Deterministic.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / "tests/fixtures/models/deberta-v2"
SEED = 4321

PARAGRAPH = (
    "Weight averaged reward models are fine-tuned from one shared initialization with "
    "different seeds and hyperparameters, and their weights are then averaged into a single "
    "model. The average keeps what the members agree on and drops what each learned alone, "
    "so it is harder to exploit during reinforcement learning, yet it costs one forward pass. "
)


def reinit_(model):
    """As the fixtures draw them: 2-D weights N(0, 1/fan_in), embeddings N(0, 1), norms
    1 + N(0, 0.1^2), biases N(0, 0.1^2): scores that move with every part of the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                if "embeddings" in name:
                    p.normal_(0.0, 1.0)
                else:
                    p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.1).add_(1.0)


def main(out: Path) -> int:
    torch.manual_seed(SEED)
    folder = out / "deberta-v3-base-random"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    config = DebertaV2Config(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
        type_vocab_size=0, relative_attention=True, max_relative_positions=-1,
        position_buckets=256, pos_att_type="p2c|c2p", share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False, layer_norm_eps=1e-7,
        pooler_hidden_size=768, pooler_hidden_act="gelu", pooler_dropout=0, num_labels=1,
        pad_token_id=tok.pad_token_id, architectures=["DebertaV2ForSequenceClassification"])
    model = AutoModelForSequenceClassification.from_config(config)
    reinit_(model)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder), legacy_format=False)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), torch_dtype=torch.float32)
    model.eval()

    words = (PARAGRAPH * 20).split()

    def fit(budget, **extra):
        """The longest run of the paragraph's words that encodes to at most `budget` tokens."""
        n = 1
        while len(tok(" ".join(words[: n + 1]), **extra)["input_ids"]) <= budget:
            n += 1
        return " ".join(words[:n])

    cases = [
        {"kind": "text", "text": "Hi!"},
        {"kind": "pair", "prompt": "Why average reward models?", "response": fit(120)},
        {"kind": "text", "text": fit(500)},
        {"kind": "pair", "prompt": fit(200), "response": fit(260)},
    ]
    feats = []
    for case in cases:
        if case["kind"] == "text":
            enc = tok(case["text"])
        else:
            enc = tok(case["prompt"], case["response"])
        assert len(enc["input_ids"]) <= 512, len(enc["input_ids"])
        case["ids"] = list(enc["input_ids"])
        case["type_ids"] = list(enc["token_type_ids"])
        feats.append(enc)

    with torch.no_grad():
        for case, enc in zip(cases, feats):
            ids = torch.tensor([enc["input_ids"]])
            case["score"] = float(model(input_ids=ids).logits[0, 0])
        longest = max(len(c["ids"]) for c in cases)
        ids = torch.tensor([c["ids"] + [tok.pad_token_id] * (longest - len(c["ids"])) for c in cases])
        mask = torch.tensor([[1] * len(c["ids"]) + [0] * (longest - len(c["ids"])) for c in cases])
        batch = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    doc = {"architecture": "DebertaV2ForSequenceClassification",
           "max_length": config.max_position_embeddings, "cases": cases, "batch_scores": batch}
    (folder / "expected.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(folder, [len(c["ids"]) for c in cases], [round(c["score"], 6) for c in cases])
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_deberta_base.py OUT")
    sys.exit(main(Path(sys.argv[1])))
