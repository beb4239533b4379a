"""Tiny Gemma 2 / Gemma 3 text models built from explicit configs, for the tests that need what
``workbench.models.tiny``'s models do not have: a logit soft-cap (Gemma 2), or a window and a layer
pattern chosen by the test. One builder, so every such test means the same model."""

from __future__ import annotations

from pathlib import Path

import torch


def gemma_config(arch: str):
    """Gemma 2 (logit soft-cap 5) or Gemma 3 text: 2 layers (sliding window 6 on layer 0, global
    layer 1), GQA 4:2, head_dim 16, query_pre_attn_scalar 16, BOS 2 / EOS 3 / PAD 1."""
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=6,
        query_pre_attn_scalar=16,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma2Config(attn_logit_softcapping=5.0, **common) if arch == "gemma2" else Gemma3TextConfig(**common)


def save_tiny(folder: Path, cfg, scale_qk: float = 8.0) -> Path:
    """Build ``cfg`` with seed 0, scale q/k up (sharper attention than a random init gives) and
    write it with the tiny word-level tokenizer to ``folder``."""
    from transformers import AutoModelForCausalLM

    from workbench.models.tiny import _tiny_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(scale_qk)
    model.save_pretrained(folder)
    _tiny_tokenizer(cfg.vocab_size).save_pretrained(folder)
    return Path(folder)
