"""Ablations: what a component's output becomes when it is removed from a circuit.

A circuit is evaluated by running the clean prompts with every component *outside* it ablated.
How it is ablated changes the answer a lot, so the ablation is always named with the result:

- ``mean`` (Wang et al., IOI): each head's output at each position is replaced by its mean over
  the reference *corrupted* prompts **of the same template, at the same position** (the
  paper's mean over the "ABC" distribution; prompts of one template align token by token).
  Templates come from the pairs' ``meta["template"]`` (IOI has 8) and prompts are grouped by
  (template, length); pairs without a template are grouped by length alone.
- ``resample``: the output a head has on a *different* corrupted prompt of the same template
  (chosen at random with a fixed seed; never the pair's own corrupted prompt).
- ``zero``: the output is zero.
- ``corrupted``: the output on the pair's own corrupted prompt (interchange ablation, the
  "corrupted" activations of activation / edge patching).

The reference prompts default to the pairs' own corrupted prompts; Wang et al. average over a
separate sample of the corrupted distribution, which :func:`make_ablation` takes as
``reference`` (the CLI draws ``--reference-prompts`` extra pairs of the task with another seed).

:class:`Ablation` holds, aligned with the pairs' clean batch, each head's replacement ``z``
(before ``W_O``) and, for models :class:`~circuits.graph.ModelGraph` supports, the
replacement token embeddings and MLP outputs (the other nodes of the edge graph).
:class:`HeadAblator` applies head ablations through the attention hook, for any architecture,
to many stacked variants at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.tasks import Pair
from workbench.engine.call import AttentionCall
from workbench.engine.edits import Sites, ZEdit
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.prompts import pad_token_id

ABLATIONS = ("mean", "resample", "zero", "corrupted")
Head = tuple[int, int]


@dataclass
class Ablation:
    """Replacement values for ablated components, aligned with the pairs' clean batch."""

    mode: str
    z: dict[int, Float[Tensor, "batch pos head d_head"]]
    embed: Float[Tensor, "batch pos d_model"] | None = None
    mlp_out: dict[int, Tensor] | None = None
    n_reference: int = 0
    sources: list[list[int]] = field(default_factory=list)  # per pair: the reference prompts used

    def describe(self) -> str:
        return {
            "mean": f"mean over {self.n_reference} corrupted prompts, per template position",
            "resample": f"resampled from another corrupted prompt of the same template ({self.n_reference} available)",
            "zero": "zero ablation",
            "corrupted": "the pair's own corrupted prompt (interchange)",
        }[self.mode]


def group_key(p: Pair) -> tuple:
    """Prompts that align position by position: same template (if known) and same length."""
    return (p.meta.get("template"), len(p.corrupted))


def reference_sources(pairs: Sequence[Pair], reference: Sequence[Pair], mode: str, seed: int = 0) -> list[list[int]]:
    """For each pair, the reference prompts its ablated values come from (all of its group for
    ``mean``, one other prompt for ``resample``)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reference):
        groups.setdefault(group_key(r), []).append(i)
    rng = random.Random(seed)
    out = []
    for p in pairs:
        key = group_key(p)
        members = groups.get(key, [])
        if mode == "resample":
            members = [i for i in members if reference[i].corrupted != p.corrupted]
        if not members:
            what = f"template {key[0]!r}, {key[1]} tokens" if key[0] is not None else f"{key[1]} tokens"
            raise WorkbenchError(
                f"pair {p.id!r}: no {'other ' if mode == 'resample' else ''}reference prompt "
                f"shares its template ({what})",
                'give more reference prompts of every template (--reference-prompts), or pairs with a "template" field',
            )
        out.append(members if mode == "mean" else [rng.choice(members)])
    return out


def _gather(x: Tensor, sources: list[list[int]], lengths: list[int], width: int) -> Tensor:
    """Per pair, the mean over its source rows of ``x`` ``[R, T_ref, ...]`` at positions < length."""
    out = x.new_zeros(len(sources), width, *x.shape[2:])
    for b, (src, n) in enumerate(zip(sources, lengths)):
        out[b, :n] = x[src, :n].mean(0)
    return out


def _record_reference(model, prompts: list[list[int]], graph) -> dict:
    """Each layer's z (and, with a graph, embeddings and MLP outputs) on the reference prompts."""
    batch = collate(prompts, pad_token_id(model.tokenizer), model.device)
    if graph is not None:
        rec: dict = {}
        last = batch.lengths - 1
        zeros = torch.zeros_like(last)
        with torch.no_grad():
            graph.logit_diff(batch, last, zeros, zeros, record=rec)
        return {"z": rec["z"], "embed": rec["embed"], "mlp_out": rec["mlp_out"]}
    from circuits.baseline import ZRecorder, hooked_forward

    rz = ZRecorder()
    hooked_forward(model, batch, [rz])
    return {"z": rz.z}


def make_ablation(
    model, base, mode: str = "mean", reference: Sequence[Pair] | None = None, seed: int = 0, graph=None
) -> Ablation:
    """Replacement values for ``mode`` over ``reference`` (default: the pairs' own corrupted
    prompts). ``base`` is the pairs' :class:`~circuits.baseline.Baseline`; ``graph`` (a
    :class:`~circuits.graph.ModelGraph`, made here when the model supports it) adds the
    embeddings' and MLPs' replacement values for edge-level circuits."""
    if mode not in ABLATIONS:
        raise WorkbenchError(f"unknown ablation {mode!r}", f"choose from: {', '.join(ABLATIONS)}")
    if graph is None:
        from circuits.graph import ModelGraph

        try:
            graph = ModelGraph(model)
        except WorkbenchError:
            graph = None
    pairs = base.pairs
    B, T = base.pb.size, base.pb.clean.input_ids.shape[1]
    lengths = [len(p.clean) for p in pairs]
    if mode == "zero":
        z = {layer: torch.zeros_like(t) for layer, t in base.z_clean.items()}
        if graph is None:
            return Ablation(mode, z)
        d = graph.d
        zeros = base.z_clean[0].new_zeros(B, T, d)
        return Ablation(mode, z, zeros, {layer: zeros for layer in range(graph.L)})
    if mode == "corrupted":
        ref, sources = list(pairs), [[i] for i in range(len(pairs))]
    else:
        ref = list(reference) if reference is not None else list(pairs)
        sources = reference_sources(pairs, ref, mode, seed)
    rec = _record_reference(model, [r.corrupted for r in ref], graph)
    z = {layer: _gather(t, sources, lengths, T) for layer, t in rec["z"].items()}
    abl = Ablation(mode, z, n_reference=len(ref), sources=sources)
    if "embed" in rec:
        abl.embed = _gather(rec["embed"], sources, lengths, T)
        abl.mlp_out = {layer: _gather(t, sources, lengths, T) for layer, t in rec["mlp_out"].items()}
    return abl


class HeadAblator(ZEdit):
    """Attention-hook observer: ``m`` variants of the ``b`` clean rows stacked along the batch;
    ``masks[layer]`` is ``[m, head]``, True where that variant ablates that head (its z becomes
    the ablation's value at every position). Layers run on the ``b`` un-repeated rows (before
    the variants fork, see :func:`circuits.baseline.fork_at`) must ablate the same heads in
    every variant; the first variant's mask is used there."""

    label = "circuit ablation"

    def __init__(self, abl: Ablation, m: int, b: int, masks: dict[int, Bool[Tensor, "m head"]]) -> None:
        self.abl, self.m, self.b, self.masks = abl, m, b, masks

    def sites(self) -> Sites:
        return {layer: frozenset(mask.any(0).nonzero().flatten().tolist()) for layer, mask in self.masks.items()}

    def edit(self, call: AttentionCall, z: Tensor) -> Tensor:
        mask = self.masks.get(call.layer)
        if mask is None or not bool(mask.any()):
            return z
        if z.shape[0] == self.b and self.m > 1:  # before the variants fork: they all ablate the same heads here
            mask = mask[:1]
        zz = z.view(mask.shape[0], self.b, *z.shape[1:])
        src = self.abl.z[call.layer].to(z.dtype).unsqueeze(0)
        return torch.where(mask[:, None, None, :, None], src, zz).reshape(z.shape)


def masks_for(ablate_sets: Sequence[Iterable[Head]], n_layers: int, n_heads: int, device) -> dict[int, Tensor]:
    """``[m, head]`` masks per layer from one set of heads to ablate per variant."""
    m = len(ablate_sets)
    masks = {layer: torch.zeros(m, n_heads, dtype=torch.bool, device=device) for layer in range(n_layers)}
    for i, heads in enumerate(ablate_sets):
        for layer, head in heads:
            masks[int(layer)][i, int(head)] = True
    return masks
