"""Checks that `warm fuse` output is a checkpoint Hugging Face transformers loads, and that
its weights and scores equal a weighted average computed in PyTorch.

Run offline with the reference environment (design.md section 9), not in CI:

    source /tmp/warm-ref/env/env.sh
    python3 scripts/check_fuse_with_transformers.py target/release/warm [FUSE ARGS...]

Extra arguments go to `warm fuse` (scripts/gpu-check.sh passes `--device cuda`). One table
row per output type.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification


def load(out: Path):
    try:
        return AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    except TypeError:  # transformers before `dtype` replaced `torch_dtype`
        return AutoModelForSequenceClassification.from_pretrained(out, torch_dtype=torch.float32).eval()


def main(warm: str, extra: list) -> int:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="warm-fuse-check-"))
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    init = LlamaForSequenceClassification(config).eval()
    members, dirs = [], []
    for i in range(3):
        m = LlamaForSequenceClassification(config).eval()
        m.load_state_dict(init.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        d = tmp / f"member{i}"
        m.save_pretrained(d, safe_serialization=True)
        members.append(m)
        dirs.append(d)
    weights = [1.0, 2.0, 3.0]
    ok = True
    for dtype, tol in [("f32", 1e-6), ("bf16", 1e-2)]:
        out = tmp / f"fused-{dtype}"
        args = [warm, "fuse", "--output", str(out), "--weights", ",".join(map(str, weights)), "--dtype", dtype]
        for d in dirs:
            args += ["--model", str(d)]
        run = subprocess.run(args + extra, capture_output=True, text=True)
        if run.returncode != 0:
            why = " / ".join(run.stderr.strip().splitlines()[-3:]).replace("|", " ")
            print(f"| warm fuse {' '.join(extra)} vs PyTorch | 3 Llama members to {dtype} | FAIL | "
                  f"exit {run.returncode}: {why} |", flush=True)
            ok = False
            continue
        fused = load(out)
        total = sum(weights)
        max_w = 0.0
        ref_state = {}
        for name, t in fused.state_dict().items():
            ref = sum(w / total * m.state_dict()[name].double() for w, m in zip(weights, members))
            ref_state[name] = ref.float()
            max_w = max(max_w, (t.double() - ref).abs().max().item())
        ref_model = LlamaForSequenceClassification(config).eval()
        ref_model.load_state_dict(ref_state)
        ids = torch.randint(1, 128, (4, 12))
        with torch.no_grad():
            got = fused(input_ids=ids).logits.squeeze(-1)
            want = ref_model(input_ids=ids).logits.squeeze(-1)
        max_s = (got - want).abs().max().item()
        cfg = json.loads((out / "config.json").read_text())
        passed = max_w < tol
        print(f"| warm fuse {' '.join(extra)} vs PyTorch | 3 Llama members to {dtype} | {'ok' if passed else 'FAIL'} | "
              f"transformers loads {type(fused).__name__} (torch_dtype {cfg['torch_dtype']}); "
              f"max weight gap {max_w:.2e} (tolerance {tol:.0e}), max score gap {max_s:.2e} |", flush=True)
        ok &= passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "target/release/warm", sys.argv[2:]))
