"""The two inputs of a divergence item: the same text with a condition and without it.

Vision-aware head divergence (VHD) compares each head's output with the image and without it;
context-aware divergence compares it with a context passage and without it. Both are one
construction: an item becomes a :class:`ConditionPair` of two unpadded model inputs
(:class:`Condition`) that end in the same text, so the positions that generate the answer
correspond one to one.

Items are ordinary prompts-JSONL lines (:mod:`workbench.inputs.prompts`) with extra fields:

- images: ``{"id", "text", "image"}`` plus optionally ``"counter_image"``. ``text`` holds the
  model's image placeholder (``<image>`` for LLaVA, ``<start_of_image>`` for Gemma 3) where the
  image goes. Without the image, the placeholder is removed from the text and the rest is
  processed by the same processor, so the text tokens and their positions are exactly what the
  model sees for a text-only prompt ("positions handled as the model does"). With
  ``counter_image`` the counterfactual is that image instead of no image (the image replaced by
  itself gives zero divergence). Image paths are relative to the JSONL file. ``<image>`` is
  accepted as a generic placeholder for every family.
- context: ``{"id", "text", "context"}`` plus optionally ``"target_context"`` and
  ``"target_memory"`` (the answer the passage implies and the one the model knows). The
  conditioned prompt is ``context + separator + text``; the counterfactual is ``text`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from workbench.errors import WorkbenchError
from workbench.inputs.prompts import Prompt

# Per-token model inputs besides input_ids: padded with 0 and extended over generated tokens.
TOKEN_ALIGNED = ("token_type_ids", "mm_token_type_ids")
GENERIC_PLACEHOLDER = "<image>"


@dataclass
class Condition:
    """One unpadded model input: token ids, per-row extras, and which tokens are the condition."""

    input_ids: list[int]
    extras: dict[str, Tensor] = field(default_factory=dict)  # pixel_values [n_img, ...]; token_type_ids [pos]
    condition_mask: list[bool] = field(default_factory=list)  # True on image / context tokens

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class ConditionPair:
    """An item under its condition (``cond``) and the counterfactual (``base``)."""

    id: str
    cond: Condition
    base: Condition
    meta: dict[str, Any] = field(default_factory=dict)


# -- images -----------------------------------------------------------------------------------
def load_image(path: str | Path) -> Any:
    """Open an image file as RGB, or fail with the path and the reason.

    PIL's decompression-bomb guard applies from its warning level on: an image whose header
    declares more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused before any pixel is
    decoded (PIL only warns up to twice that and would decode it). The limit itself is left as
    the user set it. Truncated or corrupt image data is refused too.
    """
    import re
    import struct
    import warnings
    import zlib

    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"image {path} does not exist", "check the item's image path (relative to the JSONL file)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        size = re.search(r"\((\d+) pixels\)", str(exc))
        raise WorkbenchError(
            f"image {path} is too large: {size.group(1) + ' pixels' if size else 'its size'}, "
            f"over the limit of {Image.MAX_IMAGE_PIXELS} pixels "
            "(PIL's guard against decompression bombs)",
            "downscale the image (the model's processor resizes it anyway), e.g. to 1024 x 1024",
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise WorkbenchError(
            f"cannot read image {path}: {exc}",
            "give a PNG/JPEG/... file that PIL can open (re-export it if it is truncated or corrupt)",
        ) from None


def image_placeholder(processor: Any) -> str:
    """The text placeholder where the model's processor expects the image."""
    token = getattr(processor, "image_token", None)
    if not token:
        raise WorkbenchError(f"{type(processor).__name__} names no image placeholder", "use a LLaVA or Gemma 3 model")
    return str(token)


def _image_token_ids(processor: Any) -> set[int]:
    tok = processor.tokenizer
    ids = set()
    for name in ("image_token_id", "image_token_ids"):
        val = getattr(processor, name, None)
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    for name in ("image_token", "boi_token", "eoi_token"):
        val = getattr(tok, name, None)
        if isinstance(val, str):
            ids.add(int(tok.convert_tokens_to_ids(val)))
    return ids


def _process(model: Any, text: str, image: Any | None) -> Condition:
    proc = model.processor
    enc = proc(text=[text], images=[[image]] if image is not None else None, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    extras: dict[str, Tensor] = {}
    for key, val in enc.items():
        if key in ("input_ids", "attention_mask") or not isinstance(val, Tensor):
            continue
        extras[key] = val[0] if key in TOKEN_ALIGNED else val
    special = _image_token_ids(proc)
    return Condition(ids, extras, [t in special for t in ids])


def _refuse_far_too_long(tokenizer: Any, item_id: str, text: str, n_ctx: int) -> None:
    """The context-length error before tokenizing a huge text (see :mod:`workbench.inputs.token_bounds`)."""
    from workbench.inputs.prompts import CHEAP_CHECK_CHARS
    from workbench.inputs.token_bounds import min_tokens

    if len(text) > max(CHEAP_CHECK_CHARS, 8 * n_ctx):
        at_least = min_tokens(tokenizer, text, n_ctx)
        if at_least > n_ctx:
            raise WorkbenchError(
                f"item {item_id!r} has at least {at_least} tokens, longer than the model's context of {n_ctx}",
                "shorten the text or context, or generate fewer tokens",
            )


def image_pair(model: Any, item: Prompt, root: Path | None = None) -> ConditionPair:
    """The item with its image and without it (or with ``counter_image`` instead)."""
    if not model.is_multimodal:
        raise WorkbenchError(
            f"{model.name} is a text model and cannot take images (item {item.id!r})",
            "use a vision-language model (e.g. llava-hf/llava-1.5-7b-hf, tiny-llava), "
            "or context items for a text model",
        )
    if not item.text:
        raise WorkbenchError(f"item {item.id!r} has no text", "give each item a 'text' with the image placeholder")
    placeholder = image_placeholder(model.processor)
    text = item.text
    if placeholder not in text and GENERIC_PLACEHOLDER in text:
        text = text.replace(GENERIC_PLACEHOLDER, placeholder)  # the generic placeholder works for every family
    if text.count(placeholder) != 1:
        raise WorkbenchError(
            f"item {item.id!r}: its text has {text.count(placeholder)} {placeholder!r} placeholders; "
            f"{model.name} needs exactly one where the image goes",
            f"write the text like 'USER: {placeholder}\\nWhat is in the image? ASSISTANT:'",
        )
    if "image" not in item.meta:
        raise WorkbenchError(f"item {item.id!r} has no 'image' field", 'add "image": "path/to/file.png" to each line')
    _refuse_far_too_long(model.processor.tokenizer, item.id, text, model.n_ctx)
    root = Path(root) if root is not None else Path(".")
    image = load_image(root / str(item.meta["image"]))
    cond = _process(model, text, image)
    if item.meta.get("counter_image"):
        base = _process(model, text, load_image(root / str(item.meta["counter_image"])))
    else:
        base = _process(model, text.replace(placeholder, ""), None)
    return ConditionPair(item.id, cond, base, dict(item.meta))


# -- context ----------------------------------------------------------------------------------
def passage_ids(tokenizer: Any, passage: str, text: str, separator: str = "\n") -> tuple[list[int], int]:
    """The tokens of ``passage + separator + text`` and how many of them the passage and separator
    take (exact when the tokenizer splits at the separator): the context probe's run with the
    context, and what a counterfact pattern view draws (:func:`workbench.datasets.counterfact.view_rows`)."""
    prefix = passage + separator
    return list(tokenizer(prefix + text)["input_ids"]), len(tokenizer(prefix)["input_ids"])


def passage_pair(model: Any, item: Prompt, separator: str = "\n") -> ConditionPair:
    """The item's text after its context passage, and the text alone."""
    if not item.text:
        raise WorkbenchError(f"item {item.id!r} has no text", "give each item a 'text' (the question)")
    context = item.meta.get("context")
    if not isinstance(context, str) or not context.strip():
        raise WorkbenchError(f"item {item.id!r} has no 'context' passage", 'add "context": "..." to each line')
    tok = model.tokenizer
    _refuse_far_too_long(tok, item.id, context + separator + item.text, model.n_ctx)
    cond_ids, n_prefix = passage_ids(tok, context, item.text, separator)
    base_ids = list(tok(item.text)["input_ids"])
    # the context span: tokens before the text (exact when the tokenizer splits at the separator).
    # Position 0 is left out: it is where attention sinks put their weight whatever the token
    # (a BOS, or, in models that prepend none such as SmolLM2, the passage's first word), so
    # counting it would credit sink heads with reading the passage.
    mask = [0 < i < n_prefix for i in range(len(cond_ids))]
    return ConditionPair(
        item.id, Condition(cond_ids, {}, mask), Condition(base_ids, {}, [False] * len(base_ids)), dict(item.meta)
    )


def check_lengths(pairs: list[ConditionPair], n_ctx: int, extra: int = 0) -> None:
    """Every input plus ``extra`` generated tokens must fit the context."""
    if not pairs:
        raise WorkbenchError("no items to run", "give a non-empty items file")
    for p in pairs:
        for c in (p.cond, p.base):
            if len(c) == 0:
                raise WorkbenchError(f"item {p.id!r} is empty (0 tokens)", "give it some text")
            if len(c) + extra > n_ctx:
                raise WorkbenchError(
                    f"item {p.id!r} has {len(c)} tokens (+{extra} to generate), "
                    f"longer than the model's context of {n_ctx}",
                    "shorten the text or context, or generate fewer tokens",
                )
