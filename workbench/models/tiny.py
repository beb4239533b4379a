"""Tiny randomly initialised models built from a config, for fast tests and quick demos.

``make_tiny_model(folder, arch)`` writes an ordinary Hugging Face folder (config, random
weights, a word-level tokenizer trained on the shipped prose corpus), so a tiny model travels
exactly the same load path as a real local checkpoint. ``load_model("tiny-llama")`` builds one
in the cache on first use.

- ``tiny-llama``: Llama with grouped-query attention (4 query heads, 2 KV heads), rotary.
- ``tiny-gpt2``: GPT-2 with learned absolute positions and fused QKV.
- ``tiny-gemma3-text``: Gemma 3 text model (``Gemma3ForCausalLM``) with what breaks head-metric
  code in the real Gemma-3-270M, small: 4 layers, a sliding window of 8 keys on layers 0, 1, 3
  and full attention on layer 2, 4 query heads sharing 2 KV heads, head_dim 32 != hidden / heads,
  QK-norm, ``query_pre_attn_scalar`` 24 (scaling 24^-0.5, not head_dim^-0.5), separate RoPE bases
  for local and global layers, and a tokenizer that prepends BOS as Gemma's does.
- ``tiny-llava``: LLaVA (CLIP vision tower, 2-layer projector, the tiny Llama as language model)
  with a real ``LlavaProcessor`` (``<image>`` placeholder expanded to 16 image tokens).
- ``tiny-gemma3``: Gemma 3 multimodal (SigLIP tower, pooled projector, sliding-window layers,
  bidirectional attention among image tokens) with a real ``Gemma3Processor``
  (``<start_of_image>`` placeholder expanded to 4 soft tokens).

The VLM processors use the PIL image backend, as :func:`workbench.models.loading.load_model` does for
every VLM (no torchvision needed; the same pixels on every machine).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

TINY_ARCHS = ("llama", "gpt2", "gemma3_text", "llava", "gemma3")
VLM_ARCHS = ("llava", "gemma3")
_SPECIALS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]


def _tiny_tokenizer(vocab_size: int, extra_special_tokens: dict[str, str] | None = None, prepend_bos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from workbench.inputs.corpus import load_documents

    counts: Counter[str] = Counter()
    pre = pre_tokenizers.Whitespace()
    for doc in load_documents()[:300]:
        counts.update(w for w, _ in pre.pre_tokenize_str(doc["text"]))
    words = [w for w, _ in counts.most_common(vocab_size - len(_SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    if prepend_bos:  # as Gemma's tokenizer does: every encoded text starts with BOS
        backend.post_processor = processors.TemplateProcessing(
            single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        **({"extra_special_tokens": extra_special_tokens} if extra_special_tokens else {}),
    )


def tiny_config(arch: str, vocab_size: int = 512, n_ctx: int = 256, n_layers: int = 3):
    """A small config of the given architecture (fast enough for tests on 2 CPU cores);
    ``n_layers`` varies the depth (e.g. to test comparisons of models of different depth)."""
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=n_layers,
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
            n_layer=n_layers,
            n_head=4,
            n_positions=n_ctx,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    if arch == "gemma3_text":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=n_ctx,
            sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


_VLM_TOKENS = {
    "llava": {"image_token": "<image>"},
    "gemma3": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
}


def tiny_vlm(arch: str, vocab_size: int = 512, n_ctx: int = 256):
    """A tiny VLM of ``arch`` (llava / gemma3): ``(model, processor)``, random weights.

    Images are 32x32 pixels in 8x8 patches. The tokenizer is the word-level one of the text
    models plus the family's image special tokens.
    """
    from transformers import SiglipVisionConfig

    tok = _tiny_tokenizer(vocab_size, _VLM_TOKENS[arch])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in _VLM_TOKENS[arch].items()}
    n_vocab = len(tok)
    if arch == "llava":
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        text = tiny_config("llama", vocab_size=n_vocab, n_ctx=n_ctx)
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=ids["image_token"],
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=1,
        )
        model = LlavaForConditionalGeneration(cfg)
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            image_token="<image>",
        )
        return model, processor
    if arch == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        text = Gemma3TextConfig(
            vocab_size=n_vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=n_ctx,
            sliding_window=12,
            query_pre_attn_scalar=16,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        cfg = Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=ids["boi_token"],
            eoi_token_index=ids["eoi_token"],
            image_token_index=ids["image_token"],
        )
        model = Gemma3ForConditionalGeneration(cfg)
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok, image_seq_length=4
        )
        return model, processor
    raise ValueError(f"unknown tiny VLM architecture {arch!r}; choose from {VLM_ARCHS}")


def make_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model of ``arch`` with a word-level tokenizer to ``folder``.

    Weights are scaled up from the default init so attention patterns are far from uniform
    (a freshly initialised model attends almost uniformly, which would make tests of entropy
    and sink metrics weak). Gemma 3's QK-norm cancels that scale, but its normalised queries and
    keys already give peaked patterns (mean row entropy ~0.5 nats over a window of 8 keys).
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    if arch in VLM_ARCHS:
        model, processor = tiny_vlm(arch, **overrides)
        tok = processor
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
        tok = _tiny_tokenizer(model.config.vocab_size, prepend_bos=arch == "gemma3_text")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("q_proj" in name or "k_proj" in name or "c_attn" in name):
                p.mul_(8.0)
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
