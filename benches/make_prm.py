"""Makes a process reward model for speed measurements only: Qwen2.5-Math-PRM's class
(``Qwen2ForProcessRewardModel``: a Qwen2 under ``score`` = Linear(h, h), ReLU, Linear(h, 2),
read at every ``<extra_0>`` step tag) at SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads
over 3 KV heads of 64, MLP 1536), with the qwen2-prm fixture's tokenizer and vocabulary. The
weights are transformers' seeded random init (``torch.manual_seed(0)``), not trained: scores
mean nothing. ``cargo bench --bench forward -- step_rows`` times it with WARM_BENCH_PRM=OUT.

    source /tmp/warm-ref/env/env.sh
    python3 benches/make_prm.py /tmp/warm-real/prm-smollm2
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2Model

FIXTURE = Path(__file__).resolve().parent.parent / "tests/fixtures/models/qwen2-prm"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  max_window_layers=30, num_attention_heads=9, num_key_value_heads=3,
                  max_position_embeddings=4096)
    backbone = Qwen2Model(Qwen2Config(**config))
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    h = config["hidden_size"]
    for name, shape in (("score.0", (h, h)), ("score.2", (2, h))):
        layer = torch.nn.Linear(shape[1], shape[0])
        tensors[f"{name}.weight"] = layer.weight.detach().contiguous()
        tensors[f"{name}.bias"] = layer.bias.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (FIXTURE / name).is_file():
            shutil.copy(FIXTURE / name, out / name)
    print(out, sum(t.numel() for t in tensors.values()), "parameters")


if __name__ == "__main__":
    main()
