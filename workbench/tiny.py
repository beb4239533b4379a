"""Tiny randomly initialised models built from a config, for fast tests and quick demos.

``make_tiny_model(folder, arch)`` writes an ordinary Hugging Face folder (config, random
weights, a word-level tokenizer trained on the shipped prose corpus), so a tiny model travels
exactly the same load path as a real local checkpoint. ``load_model("tiny-llama")`` builds one
in the cache on first use.

- ``tiny-llama``: Llama with grouped-query attention (4 query heads, 2 KV heads), rotary.
- ``tiny-gpt2``: GPT-2 with learned absolute positions and fused QKV.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

TINY_ARCHS = ("llama", "gpt2")
_SPECIALS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]


def _tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workbench.datasets.prose import load_documents

    counts: Counter[str] = Counter()
    pre = pre_tokenizers.Whitespace()
    for doc in load_documents()[:300]:
        counts.update(w for w, _ in pre.pre_tokenize_str(doc["text"]))
    words = [w for w, _ in counts.most_common(vocab_size - len(_SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def tiny_config(arch: str, vocab_size: int = 512, n_ctx: int = 256):
    """A small config of the given architecture (fast enough for tests on 2 CPU cores)."""
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=n_ctx,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
            tie_word_embeddings=False,
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=n_ctx,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


def make_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``arch`` with a word-level tokenizer to ``folder``.

    Weights are scaled up from the default init so attention patterns are far from uniform
    (a freshly initialised model attends almost uniformly, which would make tests of entropy
    and sink metrics weak).
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("q_proj" in name or "k_proj" in name or "c_attn" in name):
                p.mul_(8.0)
    tok = _tiny_tokenizer(cfg.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
