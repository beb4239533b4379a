"""Head interventions: ablate chosen heads during any probe run or generation.

Each is a ``Z`` edit of the declared intervention protocol (:mod:`workbench.engine.edits`): it
edits the per-head output z (before ``W_O``) of chosen ``(layer, head)`` pairs, at every query
position:

- ``zero``: z = 0 (the head's contribution removed; W_O has no bias in most models).
- ``mean``: z = the head's mean output over a reference set of prompts (mean ablation keeps the
  head's average contribution, removing only what depends on the input).
- ``first``: attention redirected entirely to the prompt's first token, so z = v(first token)
  of the head's KV group (the active-dormant test of Guo et al.: a dormant head already puts
  nearly all its attention there, so the change measures what the head does when active).

and one ``WEIGHTS`` edit, :class:`HeadFlattening` (``flat``): the chosen heads' attention weights
set uniform, 1 / (number of keys the row can see), keys counted from the prompt's first real
token (padding never gets weight). This is AttentionInfluence's mask (Hua et al. 2025,
arXiv 2505.07293, App. C): the paper sets the weights to 1/L, "uniform over the sequence"; for a
causal row we read L as the row's visible prefix (on a sliding-window layer, its window), since a
query cannot attend to later keys. The head still reads its values, but no longer chooses among
them. Definitions: docs/metrics.md#influence.

Use from Python with ``run_probes(..., interventions=[HeadAblation(...)])`` or any generation
under :func:`workbench.engine.call.observe` (:func:`head_ablation` builds either class by mode);
from the CLI with ``--ablate 12.3,14.0 --ablation zero`` (or ``flat``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.engine.call import AttentionCall
from workbench.engine.edits import Rows, Sites, WeightsEdit, ZEdit, ZReader, sites_of
from workbench.engine.masking import first_visible_key
from workbench.errors import WorkbenchError

MODES = ("zero", "mean", "first")  # Z edits (HeadAblation)
ABLATIONS = (*MODES, "flat")  # every ablation by name: + the WEIGHTS edit (HeadFlattening)


def parse_heads(
    spec: str | Iterable,
    n_layers: int,
    n_heads: int,
    purpose: str = "to ablate",
    example: str = "--ablate 12.3,14.0",
) -> list[tuple[int, int]]:
    """``"12.3,14.0"`` (or pairs) -> ``[(12, 3), (14, 0)]``, checked against the model's shape,
    once each in the order given; ``purpose`` and ``example`` word the errors for the caller."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    heads: list[tuple[int, int]] = []
    for item in items:
        try:
            layer, head = (int(x) for x in (item.split(".") if isinstance(item, str) else item))
        except (ValueError, TypeError):
            raise WorkbenchError(f"bad head {item!r}", f"write heads as LAYER.HEAD, e.g. {example}") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise WorkbenchError(
                f"head {layer}.{head} is out of range: the model has layers 0-{n_layers - 1} and heads 0-{n_heads - 1}",
                "pick heads inside that range",
            )
        heads.append((layer, head))
    if not heads:
        raise WorkbenchError(f"no heads {purpose}", f"give LAYER.HEAD pairs, e.g. {example}")
    return list(dict.fromkeys(heads))


class HeadAblation(ZEdit):
    """Replace the output z of chosen heads (``zero``, ``mean`` or ``first``): a ``Z`` edit."""

    def __init__(self, heads: Sequence[tuple[int, int]], mode: str = "zero", means: Tensor | None = None) -> None:
        if mode not in MODES:
            raise WorkbenchError(f"unknown ablation {mode!r}", f"choose from: {', '.join(MODES)}")
        if mode == "mean" and means is None:
            raise WorkbenchError("mean ablation needs head means", "compute them with head_means(model, prompts)")
        self.mode = mode
        self.means = means
        self.label = f"{mode} ablation"
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self.by_layer.setdefault(int(layer), []).append(int(head))

    def sites(self) -> Sites:
        return sites_of((layer, h) for layer, hs in self.by_layer.items() for h in hs)

    def edit(self, call: AttentionCall, z: Float[Tensor, "batch query head d_head"]) -> Tensor:
        heads = self.by_layer.get(call.layer)
        if not heads:
            return z
        z = z.clone()
        idx = torch.tensor(heads, device=z.device)
        if self.mode == "zero":
            z[:, :, idx] = 0
        elif self.mode == "mean":
            z[:, :, idx] = self.means[call.layer, idx].to(z.dtype)
        else:  # first: attention all on the first visible key of each prompt
            first = first_visible_key(call)
            group = call.query.shape[1] // call.key.shape[1]
            v = call.value[torch.arange(z.shape[0], device=z.device), :, first]  # [batch, kv_head, d]
            z[:, :, idx] = v[:, idx // group].unsqueeze(1).to(z.dtype)
        return z


class HeadFlattening(WeightsEdit):
    """Uniform attention on chosen heads (AttentionInfluence's mask): each row's weights become
    1 / (number of keys it can see), over its visible prefix only (never padding, never later
    keys; a sliding-window layer's window). A ``WEIGHTS`` edit, declared on ``heads``."""

    def __init__(self, heads: Sequence[tuple[int, int]]) -> None:
        self.heads_edited = [(int(layer), int(head)) for layer, head in heads]
        self.label = "flat attention"

    def sites(self) -> Sites:
        return sites_of(self.heads_edited)

    def edit(self, call: AttentionCall, x: Rows) -> Float[Tensor, "batch head block key"]:
        visible = x.visible.to(x.values.dtype)
        return visible / visible.sum(-1, keepdim=True).clamp_min(1.0)


def head_ablation(
    heads: Sequence[tuple[int, int]], mode: str = "zero", means: Tensor | None = None
) -> HeadAblation | HeadFlattening:
    """The intervention named by ``mode`` (one of :data:`ABLATIONS`) on ``heads``."""
    if mode == "flat":
        return HeadFlattening(heads)
    if mode not in MODES:
        raise WorkbenchError(f"unknown ablation {mode!r}", f"choose from: {', '.join(ABLATIONS)}")
    return HeadAblation(heads, mode, means)


class _MeanRecorder(ZReader):
    def __init__(self, n_layers: int, n_heads: int, d_head: int, device) -> None:
        self.sum = torch.zeros(n_layers, n_heads, d_head, dtype=torch.float64, device=device)
        self.count = 0
        self.valid: Tensor | None = None

    def read(self, call: AttentionCall, z: Tensor) -> None:
        v = self.valid[:, -z.shape[1] :].to(z.dtype).view(z.shape[0], z.shape[1], 1, 1)
        self.sum[call.layer] += (z * v).sum((0, 1)).double()
        if call.layer == 0:
            self.count += int(v.sum())


def head_means(model, prompts, batch_size: int = 8) -> Float[Tensor, "layer head d_head"]:
    """Each head's mean output z over every real token of ``prompts`` (for mean ablation)."""
    from workbench.engine.attention import hooked_run
    from workbench.engine.call import base_network
    from workbench.engine.patterns import collate
    from workbench.inputs.prompts import pad_token_id

    d_head = model.d_head
    rec = _MeanRecorder(model.n_layers, model.n_heads, d_head, model.device)
    pad = pad_token_id(model.tokenizer)
    base = base_network(model.hf_model)
    with hooked_run(model.hf_model, rec):
        for i in range(0, len(prompts), batch_size):
            batch = collate([p.ids for p in prompts[i : i + batch_size]], pad, model.device)
            rec.valid = batch.valid
            base(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.positions.clamp_min(0),
                use_cache=False,
            )
    return (rec.sum / max(rec.count, 1)).float()


class HeadScaling(ZEdit):
    """Scale the output z of chosen heads by ``alpha`` (VHR-style head reinforcement).

    ``positions="first"`` (VHR, He et al. 2025: "at the first generated token"): only the query
    position that generates the first token, i.e. the last prompt position of the prefill (a
    forward whose queries cover all its keys); decoding steps are left alone.
    ``positions="all"``: every query position of every forward.
    """

    def __init__(self, heads: Sequence[tuple[int, int]], alpha: float = 2.0, positions: str = "first") -> None:
        if positions not in ("first", "all"):
            raise WorkbenchError(f"unknown positions {positions!r}", "use 'first' or 'all'")
        self.alpha = float(alpha)
        self.positions = positions
        self.heads = [(int(layer), int(head)) for layer, head in heads]
        self.label = f"head scaling x{self.alpha:g}"
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self.by_layer.setdefault(layer, []).append(head)

    def sites(self) -> Sites:
        return sites_of(self.heads)

    def edit(self, call: AttentionCall, z: Float[Tensor, "batch query head d_head"]) -> Tensor:
        heads = self.by_layer.get(call.layer)
        if not heads:
            return z
        prefill = call.query.shape[2] == call.key.shape[2]
        if self.positions == "first" and not prefill:
            return z
        z = z.clone()
        idx = torch.tensor(heads, device=z.device)
        if self.positions == "first":
            z[:, -1, idx] = z[:, -1, idx] * self.alpha
        else:
            z[:, :, idx] = z[:, :, idx] * self.alpha
        return z
