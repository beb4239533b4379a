"""Visual attention sinks and image-centric heads (VAR: Kang et al., "See What You Are Told:
Visual Attention Sink in Large Multimodal Models", ICLR 2025; code seilk/VisAttnSink,
``src/logic/logic.py``: DimProspector, HeadFork).

Visual sink tokens: on the residual stream entering layer l (read with a RESID reader),

    phi(x) = max over d in D_sink of |x_d / RMS(x)|,   RMS(x) = sqrt(mean_d x_d^2 + 1e-6)

(RMSNorm without its weight, as DimProspector), and the sink set of layer l is the tokens with
phi > tau (``tau``, 20). D_sink are the model's massive dimensions (``sink_dims``; VAR lists
{1415, 2533} for LLaMA-2-7B). When ``sink_dims`` is empty they are found from the first prompt
token (BOS): the dims d where |x_d / RMS(x)| > tau on its residual entering layer ``dim_layer``
(union over the items' first tokens that are not image tokens; a first token's residual depends on
that token alone, so a one-token forward gives it).

Per (layer, head, text query i), with i a prompt position after the image (VAR's prefill
selection ``query >= image end``), image attention a_img = sum of A[i, j] over the image tokens
j, and the visual non-sink ratio r = (attention on image tokens that are not sinks) / a_img. The
query is *image-centric* when a_img >= ``summ`` (0.2) and r >= ``rho`` (0.5). The code tests the
sink share <= rho (i.e. r >= 1 - rho), the same at the default 0.5; and it selects no head of a
layer whose image holds no sink (nothing to redistribute: ``require_sinks``). A query that sees
no image token (a sliding window) has r = 1, as in the code (its sink share is 0 / 1e-6).

Metrics (layer, head), pooled over every (item, text query); ``n`` = those queries:
- ``visual_nonsink_ratio``: the mean of r;
- ``image_centric_rate``: the share of queries on which the head is image-centric;
- ``visual_attention``: the mean a_img.
The summary holds each layer's share of image tokens that are sinks, and D_sink.

VAR computes sinks in layers 2..L-1 and excludes the last layer from redistribution; we report
every layer. The code's ratio divides by sum(A + 1e-6) over the image tokens; we divide by the
exact sum. One left-padded forward per batch (explicit positions), eager rows from
:func:`workbench.engine.masking.attention_probs`. Definitions: docs/metrics.md#var.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from pydantic import Field
from torch import Tensor

from probes.base import ItemProbe, MetricInfo
from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall
from workbench.engine.divergence import left_padded_inputs
from workbench.engine.edits import ResidReader
from workbench.engine.masking import attention_probs
from workbench.errors import WorkbenchError
from workbench.inputs.conditions import Condition, image_pair
from workbench.inputs.prompts import pad_token_id
from workbench.protocol import params as opt
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import ProbeResult

if TYPE_CHECKING:
    from workbench.inputs.prompts import Prompt
    from workbench.models.loading import LoadedModel

EPS = 1e-6  # DimProspector's RMSNorm epsilon


def normalised_abs(x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """|x_d / RMS(x)|, float32 (RMSNorm without its weight)."""
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).abs()


def image_token_id(model: LoadedModel) -> int:
    """The id of the tokens the model replaces with image features (LLaVA ``<image>``, Gemma 3's
    soft tokens; not Gemma's begin/end-of-image markers, whose processor placeholder is the begin)."""
    cfg = model.hf_model.config
    for name in ("image_token_id", "image_token_index"):
        tid = getattr(cfg, name, None)
        if isinstance(tid, int):
            return tid
    raise WorkbenchError(f"{model.name} names no image token in its config", "use a LLaVA or Gemma 3 model")


@dataclass
class VisualBatch:
    """A left-padded batch of image items: model inputs, real tokens and image tokens."""

    inputs: dict[str, Tensor]
    real: Bool[Tensor, "batch pos"]
    image: Bool[Tensor, "batch pos"]


def visual_items(model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> list[Condition]:
    """Each item (text with one image placeholder + ``image``) as the model's input with its image."""
    if not model.is_multimodal:
        raise WorkbenchError(
            f"{model.name} is a text model", "use a vision-language model (tiny-llava, LLaVA, Gemma 3)"
        )
    out = [image_pair(model, it, ctx.root).cond for it in items]
    tid = image_token_id(model)
    for it, c in zip(items, out):
        if tid not in c.input_ids:
            raise WorkbenchError(f"item {it.id!r} has no image tokens", "give the item an image placeholder and image")
    return out


def visual_batch(model: LoadedModel, rows: Sequence[Condition], suffixes: Sequence[Sequence[int]]) -> VisualBatch:
    inputs, _ = left_padded_inputs(rows, suffixes, pad_token_id(model.tokenizer), model.device, model.dtype)
    return VisualBatch(inputs, inputs["attention_mask"].bool(), inputs["input_ids"] == image_token_id(model))


class SinkReader(ResidReader):
    """phi of every token on the residual stream entering each layer."""

    def __init__(self, n_layers: int, dims: Sequence[int]) -> None:
        self.dims = list(dims)
        self.phi: list[Tensor | None] = [None] * n_layers

    def read(self, call: int, x: Float[Tensor, "batch pos d_model"]) -> None:
        if self.dims:
            self.phi[call] = normalised_abs(x)[..., self.dims].amax(-1)
        else:
            self.phi[call] = torch.zeros(x.shape[:2], device=x.device)


class FirstTokenReader(ResidReader):
    """|x_d / RMS(x)| of the (only) token entering one layer."""

    def __init__(self, layer: int) -> None:
        self.layer, self.value = layer, None

    def read(self, call: int, x: Float[Tensor, "batch pos d_model"]) -> None:
        if call == self.layer:
            self.value = normalised_abs(x[:, 0])


class HeadFork:
    """Attention observer: per layer and head, sums over text queries of r, image-centric and
    a_img (the layer's sinks come from the :class:`SinkReader`, which reads the layer first)."""

    def __init__(self, model: LoadedModel, sinks: SinkReader, tau: float, summ: float, rho: float, require: bool):
        self.sinks, self.tau, self.summ, self.rho, self.require = sinks, tau, summ, rho, require
        shape = (model.n_layers, model.n_heads)
        self.sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("ratio", "centric", "image")}
        self.n = 0
        self.sink_tokens = torch.zeros(model.n_layers, dtype=torch.float64)
        self.image_tokens = 0
        self.batch: VisualBatch | None = None

    def on_attention(self, call: AttentionCall) -> None:
        vb = self.batch
        width = vb.image.shape[1]
        pos = torch.arange(width, device=vb.image.device)
        end = torch.where(vb.image, pos, -1).amax(-1)  # last image token per row
        text_q = vb.real & (pos[None] > end[:, None])  # [b, pos]
        q0 = int(end.min()) + 1
        if call.layer == 0:
            self.n += int(text_q.sum())
            self.image_tokens += int(vb.image.sum())
        sink = vb.image & (self.sinks.phi[call.layer] > self.tau)
        self.sink_tokens[call.layer] += float(sink.sum())
        if q0 >= width:
            return  # no row has a text query after its image
        probs = attention_probs(call, width - q0).double()  # [b, h, q, key]
        text_q = text_q[:, q0:]
        a_img = (probs * vb.image[:, None, None]).sum(-1)  # [b, h, q]
        a_sink = (probs * sink[:, None, None]).sum(-1)
        ratio = torch.where(a_img > 0, 1 - a_sink / a_img, 1.0)  # no image attention (window): nothing on sinks
        centric = (a_img >= self.summ) & (ratio >= self.rho)
        if self.require:
            centric &= sink.any(-1)[:, None, None]
        skip = ~text_q[:, None]  # [b, 1, q]: not a text query after the image (ratio may be 0/0 there)
        for key, val in (("ratio", ratio), ("centric", centric.double()), ("image", a_img)):
            self.sums[key][call.layer] += val.masked_fill(skip, 0).sum((0, 2)).cpu()


def massive_dims(model: LoadedModel, rows: Sequence[Condition], layer: int, tau: float) -> list[int]:
    """The dims where the items' first tokens have |x_d / RMS(x)| > tau entering ``layer``
    (first tokens that are image tokens are skipped: their input is the image, not the token)."""
    image = image_token_id(model)
    firsts = sorted({r.input_ids[0] for r in rows} - {image})
    if not firsts:
        raise WorkbenchError("every item starts with its image: no text token to find D_sink from", "give sink_dims")
    dims: set[int] = set()
    for first in firsts:
        reader = FirstTokenReader(layer)
        with hooked_run(model.hf_model, reader):
            model.hf_model(input_ids=torch.tensor([[first]], device=model.device), use_cache=False)
        dims.update(torch.nonzero(reader.value[0] > tau).flatten().tolist())
    return sorted(dims)


class VARProbe(ItemProbe):
    """Visual sink tokens and image-centric heads of a vision-language model (VAR)."""

    name = "var"
    metrics = ("visual_nonsink_ratio", "image_centric_rate", "visual_attention")
    description = "VAR: attention of text queries to non-sink image tokens; share of image-centric (layer, head, query)"
    metric_info = {
        "visual_nonsink_ratio": MetricInfo(
            "bounded",
            "share of the head's image attention that falls on non-sink image tokens (text queries)",
            "the head looks at the image content, not its visual sinks",
            "the head's image attention is parked on visual sink tokens",
            module="probes/var.py",
        ),
        "image_centric_rate": MetricInfo(
            "bounded",
            "share of text queries with image attention >= summ and non-sink ratio >= rho (VAR)",
            "an image-centric head, whose sink attention VAR redistributes",
            module="probes/var.py",
        ),
        "visual_attention": MetricInfo(
            "bounded",
            "attention mass of text queries on the image tokens",
            "the head reads the image",
            module="probes/var.py",
        ),
    }
    scatter_pairs = (("visual_attention", "visual_nonsink_ratio"),)

    class Params(opt.Options):
        tau: opt.Float = Field(20.0, gt=0, description="sink threshold on phi = max_d |x_d / RMS(x)| (VAR: 20)")
        sink_dims: list[opt.Int] = Field(
            default_factory=list, description="D_sink, the massive dims; empty: found from the first token"
        )
        dim_layer: opt.Int = Field(2, ge=0, description="layer whose input residual of the first token gives D_sink")
        summ: opt.Float = Field(0.2, ge=0, le=1, description="image attention at least this (VAR: 0.2)")
        rho: opt.Float = Field(0.5, ge=0, le=1, description="visual non-sink ratio at least this (VAR: 0.5)")
        require_sinks: bool = Field(True, description="a layer whose image holds no sink has no image-centric head")

    @classmethod
    def accepts(cls, model: LoadedModel) -> bool:
        return model.is_multimodal

    def run(self, model: LoadedModel, items: Sequence[Prompt], ctx: RunContext) -> ProbeResult:
        p = self.options
        rows = visual_items(model, items, ctx)
        dims = list(p.sink_dims) or massive_dims(model, rows, min(p.dim_layer, model.n_layers - 1), p.tau)
        bad = [d for d in dims if not 0 <= d < model.hf_model.config.get_text_config().hidden_size]
        if bad:
            raise WorkbenchError(f"sink_dims {bad} are outside the residual stream", "give dims of the hidden size")
        sinks = SinkReader(model.n_layers, dims)
        fork = HeadFork(model, sinks, p.tau, p.summ, p.rho, p.require_sinks)
        with hooked_run(model.hf_model, *ctx.interventions, sinks, fork):
            for idx in ctx.plan([len(r) for r in rows], model.device):
                fork.batch = visual_batch(model, [rows[i] for i in idx], [[] for _ in idx])
                model.hf_model(**fork.batch.inputs, use_cache=False, logits_to_keep=1)
        n = fork.n
        table = pd.concat(
            [
                self.rows("visual_nonsink_ratio", fork.sums["ratio"] / n, n),
                self.rows("image_centric_rate", fork.sums["centric"] / n, n),
                self.rows("visual_attention", fork.sums["image"] / n, n),
            ],
            ignore_index=True,
        )
        share = (fork.sink_tokens / max(1, fork.image_tokens)).tolist()
        summary: dict[str, Any] = {"sink_dims": dims, "n_items": len(rows), "n_queries": n, "sink_share": share}
        lines = [f"var: D_sink {dims}; image tokens that are sinks, by layer: {', '.join(f'{s:.0%}' for s in share)}"]
        return self.finish(table, summary, lines)
