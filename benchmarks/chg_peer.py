"""The reference package ``nam-causal-head-gating`` 0.1.0 (PyPI), driven on given data, start and order.

A dev dependency only (the workbench never imports it). :func:`package_fit` runs the package's own
``CHGTrainer`` (its ``CHG`` pre-hooks on ``o_proj``, its ``get_logp``, its Adam, clipping and
stages) on a plain transformers model, with three things set from outside so the workbench's fit
can be compared update by update:

- the data: our examples as ``CHGDataset.from_tokens`` (right padded; the package forwards without
  an attention mask, which right padding makes harmless for a causal model);
- the initial gates: ``trainer.mask_logits`` replaced by our initial logits (in float64 when the
  model is float64: the package creates float32 masks whatever the model's precision, and with
  Adam's normalised steps at lr 1.0 float32 gates drift from float64 ones by ~1e-3 in a few updates);
- the data order: ``trainer.iterator`` replaced by our batches, collated by the package's own
  ``collate_fn`` (its right-padding truncation).

Two known defects of the package are side-stepped, not copied: its pad-column truncation cuts a
batch at the first column where every row holds the pad id, so a pad id that is also a real token
(SmolLM2's tokenizer pads with a token that can occur in text) truncates real data; we pad the
package's dataset with an id that occurs in no example. Its pattern-task word pool comes from
``list(set(...))`` (order changes with Python's hash seed); the examples here are ours.

``autocast``: the package wraps every loss in ``torch.amp.autocast(device_type)``; on a CPU that
is bfloat16 for the linear layers. ``autocast=False`` runs it with that context disabled (the
comparison at float precision); ``True`` is the package as shipped.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch


@contextlib.contextmanager
def _no_autocast():
    """The package's ``torch.amp.autocast(device)`` as a disabled context."""
    import causal_head_gating.core.trainer as trainer_mod

    real = torch.amp.autocast

    class _Off(real):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__(device_type, *args, **{**kwargs, "enabled": False})

    torch.amp.autocast = _Off
    try:
        assert trainer_mod.torch.amp.autocast is _Off
        yield
    finally:
        torch.amp.autocast = real


def package_dataset(examples: Sequence[Any], pad_id: int):
    """Our examples as the package's ``MaskedSequenceDataset``: right padded with ``pad_id``,
    loss masks on the target tokens."""
    from causal_head_gating.data.datasets import CHGDataset

    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    masks = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, ex in enumerate(examples):
        ids[i, : len(ex.ids)] = torch.tensor(ex.ids)
        masks[i, len(ex.ids) - ex.n_target : len(ex.ids)] = True
    return CHGDataset.from_tokens(ids, masks, pad_id)


def unused_id(examples: Sequence[Any], vocab_size: int) -> int:
    """A token id no example holds (the package's pad must not be a real token)."""
    used = {t for ex in examples for t in ex.ids}
    return next(t for t in range(vocab_size - 1, -1, -1) if t not in used)


def package_fit(
    hf_model: torch.nn.Module,
    examples: Sequence[Any],
    init: torch.Tensor,
    order: Sequence[Sequence[int]],
    spec: Any,
    autocast: bool = False,
) -> dict[str, Any]:
    """Run the package's three stages (``spec``: a :class:`circuits.gating.fit.GateSpec`) from
    logits ``init`` over the batches ``order``; returns ``gates`` per stage (``[init, layer,
    head]``), the history (``stage``, ``update``, ``nll``, ``l1``) and the seconds per update."""
    from causal_head_gating.core.trainer import CHGTrainer

    vocab = hf_model.get_output_embeddings().weight.shape[0]
    data = package_dataset(examples, unused_id(examples, vocab))
    trainer = CHGTrainer(
        hf_model,
        data,
        num_masks=init.shape[0],
        mask_init_range=(spec.init_low, spec.init_high),
        batch_size=spec.batch_size,
        l1_weight=spec.l1_weight,
        l1_clamp=spec.l1_clamp,
        lr=spec.lr,
        lr_end=spec.lr_end,
        lr_reg=spec.lr_reg,
        lr_reg_end=spec.lr_reg_end,
        grad_norm=spec.grad_norm,
    )
    # the same start, in the model's precision when it is wider than the package's float32 masks
    dtype = torch.promote_types(next(hf_model.parameters()).dtype, torch.float32)
    trainer.mask_logits = torch.nn.Parameter(init.detach().clone().to(dtype))
    trainer.mask_logits_pos = torch.nn.Parameter(torch.zeros_like(trainer.mask_logits))
    trainer.mask_logits_neg = torch.nn.Parameter(torch.zeros_like(trainer.mask_logits))
    trainer.iterator = iter([data.collate_fn([data[i] for i in batch]) for batch in order])
    for p in hf_model.parameters():
        p.requires_grad_(False)
    hf_model.eval()
    history: list[dict[str, Any]] = []
    ctx = contextlib.nullcontext() if autocast else _no_autocast()
    t0 = time.perf_counter()
    with ctx:
        for stage in ("none", "positive", "negative"):
            steps = spec.updates if stage == "none" else spec.reg_updates
            for _, metrics in trainer.fit_stage(stage, steps, show_progress=False):
                history.append(
                    {"stage": stage, "update": metrics["num_update"], "nll": metrics["nll"], "l1": metrics["L1"]}
                )
            if stage == "none":
                with torch.no_grad():
                    trainer.mask_logits_pos.copy_(trainer.mask_logits)
                    trainer.mask_logits_neg.copy_(trainer.mask_logits)
    seconds = time.perf_counter() - t0
    final = trainer.get_final_masks()
    gates = {"none": final["unregularized"], "positive": final["necessary"], "negative": final["sufficient"]}
    return {"gates": {k: v.float() for k, v in gates.items()}, "history": history, "seconds": seconds,
            "per_update": seconds / len(history)}  # fmt: skip
