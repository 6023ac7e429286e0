"""Makes a Gemma2 reward model for speed measurements only: SmolLM2-135M's shapes (hidden 576,
30 layers, 9 heads over 3 KV heads of 64, MLP 1536, vocabulary 49152) in
``Gemma2ForSequenceClassification``, so that Gemma2's own costs (the tanh GELU, the extra norms,
attention capping, sliding windows) are timed on a model as large as the SmolLM2 one. The weights
are transformers' seeded random init (``torch.manual_seed(0)``), not trained: scores mean nothing,
but warm and transformers must still agree on them. The tokenizer files are copied from the
SmolLM2 reward model that ``scripts/make_real_checkpoints.py`` writes.

    source /tmp/warm-ref/env/env.sh
    python3 benches/make_gemma2_rm.py /tmp/warm-real/smollm2-rm /tmp/warm-real/gemma2-rm
"""
import shutil
import sys
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2ForSequenceClassification

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        query_pre_attn_scalar=64,
        max_position_embeddings=8192,
        sliding_window=4096,
        hidden_activation="gelu_pytorch_tanh",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        num_labels=1,
    )
    model = Gemma2ForSequenceClassification(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(source / name, out / name)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
