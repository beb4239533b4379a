"""The model as a computational graph, with an explicit forward pass (Llama family).

Circuit methods that work on *edges* (edge attribution patching, exact edge patching, edge
circuits) and the fast path-patching engine need what a fused forward hides: every head's
output as its own term of the residual stream, and every reader of the residual stream (a
head's query, a KV head's key / value, an MLP, the logits) with an input of its own. This
module computes the forward explicitly from the model's own weights, in the same order and
precision as transformers' Llama implementation (tests check the logit difference against
a plain forward), and names the graph the way the EAP / ACDC literature does:

- **upstream nodes** (writers): the token embeddings ``input``, every head ``a{l}.{h}``
  (its output ``W_O^h z_h``), every MLP ``m{l}``;
- **downstream inputs** (readers): each query head ``a{l}.{h}.q``, each KV head's key and
  value ``a{l}.{g}.k`` / ``a{l}.{g}.v`` (with grouped-query attention a key / value input
  is shared by the query heads of its group), each MLP ``m{l}`` and ``logits``;
- an **edge** u -> v whenever u writes before v reads: heads of layer l feed the MLP of layer l
  and everything in later layers; an MLP feeds later layers and the logits.

Supported: decoder-only models with Llama's layout (RMSNorm, rotary q/k/v projections, an
output projection, a gated MLP): Llama, SmolLM, Mistral, Qwen2. Others raise a
:class:`WorkbenchError`; head-level methods (activation / path patching through the hook in
:mod:`workbench.engine.attention`, node ablation) work on every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.call import AttentionCall, base_network
from workbench.engine.edits import QKV, Point, at_point, check_conflicts, flatten
from workbench.errors import WorkbenchError
from workbench.protocol.views import BatchInfo

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


def _orig(mod):
    """The wrapped transformers module inside a TransformerLens bridge component."""
    inner = getattr(mod, "original_component", None)
    return inner if isinstance(inner, torch.nn.Module) else mod


def _bias(lin) -> Tensor | None:
    b = getattr(_orig(lin), "bias", None)
    return None if b is None else b.detach()


@dataclass
class _Layer:
    ln1: Tensor
    eps1: float
    wq: Float[Tensor, "head d_head d_model"]
    bq: Tensor | None
    wk: Float[Tensor, "kv_head d_head d_model"]
    bk: Tensor | None
    wv: Float[Tensor, "kv_head d_head d_model"]
    bv: Tensor | None
    wo: Float[Tensor, "d_model head_x_d_head"]
    wo_h: Float[Tensor, "head d_model d_head"]
    bo: Tensor | None
    ln2: Tensor
    eps2: float
    gate: Tensor
    up: Tensor
    down: Tensor
    scaling: float


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm, operation for operation (at least float32 statistics, weight after the cast)."""
    dt = x.dtype
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(dt)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


@dataclass
class Rows:
    """Per-row context of an explicit forward: RoPE tables, attention mask, read-out position."""

    cos: Float[Tensor, "rows pos 1 d_head"]
    sin: Float[Tensor, "rows pos 1 d_head"]
    mask: Bool[Tensor, "rows 1 pos pos"]
    last: Int[Tensor, " rows"]

    def repeat(self, m: int) -> "Rows":
        r = lambda x: x.repeat(m, *([1] * (x.dim() - 1)))  # noqa: E731
        return Rows(r(self.cos), r(self.sin), r(self.mask), r(self.last))


class ModelGraph:
    """Weights, graph indexing and the explicit forward of a Llama-family model."""

    def __init__(self, model, dtype: torch.dtype | None = None) -> None:
        hf = model.hf_model
        cfg = hf.config.get_text_config()
        mtype = getattr(cfg, "model_type", "?")
        if mtype not in SUPPORTED_TYPES or getattr(model, "is_multimodal", False):
            raise WorkbenchError(
                f"edge-level circuits and fast path patching need a Llama-family model; {model.name} is {mtype!r}",
                f"use a model of type {', '.join(SUPPORTED_TYPES)} "
                "(head-level patching and ablation work on any model)",
            )
        base = base_network(hf)
        self.model = model
        self.L, self.H = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        self.Hkv = int(getattr(cfg, "num_key_value_heads", None) or self.H)
        self.d = int(cfg.hidden_size)
        self.dh = int(getattr(cfg, "head_dim", None) or self.d // self.H)
        self.group = self.H // self.Hkv
        self.dtype = dtype or next(hf.parameters()).dtype
        self.device = model.device
        from transformers.activations import ACT2FN

        self.act = ACT2FN[cfg.hidden_act]
        w = lambda t: t.detach().to(self.dtype)  # noqa: E731
        opt = lambda t: None if t is None else w(t)  # noqa: E731
        self.layers: list[_Layer] = []
        for layer in base.layers[: self.L]:
            blk = _orig(layer)
            attn, mlp = _orig(blk.self_attn), _orig(blk.mlp)
            if getattr(attn, "q_norm", None) is not None or getattr(attn, "sliding_window", None):
                raise WorkbenchError(
                    f"{model.name}: attention with q/k norms or sliding windows is not supported here",
                    "use a Llama / SmolLM / Qwen2 model",
                )
            ln1, ln2 = _orig(blk.input_layernorm), _orig(blk.post_attention_layernorm)
            wo = w(_orig(attn.o_proj).weight)
            H, Hkv, dh, d = self.H, self.Hkv, self.dh, self.d
            self.layers.append(
                _Layer(
                    ln1=w(ln1.weight),
                    eps1=float(getattr(ln1, "variance_epsilon", getattr(ln1, "eps", 1e-6))),
                    wq=w(_orig(attn.q_proj).weight).view(H, dh, d),
                    bq=opt(_bias(attn.q_proj)),
                    wk=w(_orig(attn.k_proj).weight).view(Hkv, dh, d),
                    bk=opt(_bias(attn.k_proj)),
                    wv=w(_orig(attn.v_proj).weight).view(Hkv, dh, d),
                    bv=opt(_bias(attn.v_proj)),
                    wo=wo,
                    wo_h=wo.view(d, H, dh).permute(1, 0, 2).contiguous(),
                    bo=opt(_bias(attn.o_proj)),
                    ln2=w(ln2.weight),
                    eps2=float(getattr(ln2, "variance_epsilon", getattr(ln2, "eps", 1e-6))),
                    gate=w(_orig(mlp.gate_proj).weight),
                    up=w(_orig(mlp.up_proj).weight),
                    down=w(_orig(mlp.down_proj).weight),
                    scaling=float(getattr(attn, "scaling", dh**-0.5)),
                )
            )
            if _bias(mlp.down_proj) is not None or _bias(mlp.gate_proj) is not None:
                raise WorkbenchError(
                    f"{model.name}: MLP biases are not supported here", "use a Llama / SmolLM / Qwen2 model"
                )
        norm = _orig(base.norm)
        self.ln_f, self.eps_f = w(norm.weight), float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.w_e = w(_orig(base.embed_tokens).weight)
        head = _orig(hf.get_output_embeddings())
        self.w_u, self.b_u = w(head.weight), opt(getattr(head, "bias", None))
        self._rotary = base.rotary_emb

    # -- graph indexing ------------------------------------------------------------------------
    @property
    def n_upstream(self) -> int:
        return 1 + self.L * (self.H + 1)

    @property
    def n_downstream(self) -> int:
        return self.L * self._per_layer + 1

    @property
    def _per_layer(self) -> int:
        return self.H + 2 * self.Hkv + 1

    def head_node(self, layer: int, head: int) -> int:
        return 1 + layer * (self.H + 1) + head

    def mlp_node(self, layer: int) -> int:
        return 1 + layer * (self.H + 1) + self.H

    def n_before_attn(self, layer: int) -> int:
        """Upstream nodes that write before layer ``layer``'s attention reads."""
        return 1 + layer * (self.H + 1)

    def q_input(self, layer: int, head: int) -> int:
        return layer * self._per_layer + head

    def k_input(self, layer: int, kv_head: int) -> int:
        return layer * self._per_layer + self.H + kv_head

    def v_input(self, layer: int, kv_head: int) -> int:
        return layer * self._per_layer + self.H + self.Hkv + kv_head

    def mlp_input(self, layer: int) -> int:
        return layer * self._per_layer + self.H + 2 * self.Hkv

    @property
    def logits_input(self) -> int:
        return self.L * self._per_layer

    def upstream_name(self, u: int) -> str:
        if u == 0:
            return "input"
        layer, r = divmod(u - 1, self.H + 1)
        return f"m{layer}" if r == self.H else f"a{layer}.{r}"

    def downstream_name(self, v: int) -> str:
        if v == self.logits_input:
            return "logits"
        layer, r = divmod(v, self._per_layer)
        if r < self.H:
            return f"a{layer}.{r}.q"
        if r < self.H + self.Hkv:
            return f"a{layer}.{r - self.H}.k"
        if r < self.H + 2 * self.Hkv:
            return f"a{layer}.{r - self.H - self.Hkv}.v"
        return f"m{layer}"

    def downstream_layer(self, v: int) -> int:
        return self.L if v == self.logits_input else v // self._per_layer

    def n_readable(self, v: int) -> int:
        """How many upstream nodes (a prefix of the upstream order) input ``v`` reads."""
        if v == self.logits_input:
            return self.n_upstream
        layer, r = divmod(v, self._per_layer)
        return self.n_before_attn(layer) + (self.H if r == self.H + 2 * self.Hkv else 0)

    def edge_mask(self) -> Bool[Tensor, "downstream upstream"]:
        """True where an edge exists (u writes before v reads)."""
        n = torch.tensor([self.n_readable(v) for v in range(self.n_downstream)])
        return torch.arange(self.n_upstream)[None, :] < n[:, None]

    @property
    def n_edges(self) -> int:
        return int(sum(self.n_readable(v) for v in range(self.n_downstream)))

    # -- pieces of the forward ----------------------------------------------------------------
    def rows(self, batch: BatchInfo, last: Tensor) -> Rows:
        pos = batch.positions.clamp_min(0)
        x = self.w_e[:1].expand(1, 1, -1)
        cos, sin = self._rotary(x, position_ids=pos)
        T = pos.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=pos.device).tril()
        mask = causal[None, None] & batch.attention_mask.bool()[:, None, None, :]
        return Rows(cos.to(self.dtype)[:, :, None, :], sin.to(self.dtype)[:, :, None, :], mask, last)

    def embed(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.w_e)

    def norm1(self, layer: int, x: Tensor) -> Tensor:
        lw = self.layers[layer]
        return _rms(x, lw.ln1, lw.eps1)

    def q_of(
        self, layer: int, normed: Tensor, rows: Rows, heads: slice | list | None = None, split: bool = False
    ) -> Tensor:
        """Rotated queries ``[..., pos, head, d_head]`` from normed inputs ``[..., pos, d]`` (shared),
        or with ``split`` ``[..., pos, head, d]`` (one input per head)."""
        lw = self.layers[layer]
        wq = lw.wq if heads is None else lw.wq[heads]
        bq = (
            None
            if lw.bq is None
            else (lw.bq.view(self.H, self.dh) if heads is None else lw.bq.view(self.H, self.dh)[heads])
        )
        q = torch.einsum("...phd,hed->...phe", normed, wq) if split else torch.einsum("...pd,hed->...phe", normed, wq)
        if bq is not None:
            q = q + bq
        return q * rows.cos + _rotate_half(q) * rows.sin

    def kv_of(
        self, layer: int, normed: Tensor, rows: Rows, which: str, heads: slice | list | None = None, split: bool = False
    ) -> Tensor:
        lw = self.layers[layer]
        w, b = (lw.wk, lw.bk) if which == "k" else (lw.wv, lw.bv)
        if heads is not None:
            w = w[heads]
        x = torch.einsum("...phd,hed->...phe", normed, w) if split else torch.einsum("...pd,hed->...phe", normed, w)
        if b is not None:
            bb = b.view(self.Hkv, self.dh)
            x = x + (bb if heads is None else bb[heads])
        return x * rows.cos + _rotate_half(x) * rows.sin if which == "k" else x

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rows: Rows) -> Float[Tensor, "rows pos head d_head"]:
        """z = softmax(q k^T * scaling + mask) v with grouped KV heads; layout [rows, pos, head, d]."""
        g = q.shape[2] // k.shape[2]
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if g > 1:
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        z = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=rows.mask, scale=self.layers[layer].scaling)
        return z.transpose(1, 2)

    def attn_out(self, layer: int, z: Tensor) -> Tensor:
        lw = self.layers[layer]
        return F.linear(z.flatten(-2), lw.wo, lw.bo)

    def head_out(
        self, layer: int, z: Tensor, heads: slice | list | None = None
    ) -> Float[Tensor, "... pos head d_model"]:
        """Each head's own write into the residual stream, W_O^h z_h (no bias)."""
        wo = self.layers[layer].wo_h if heads is None else self.layers[layer].wo_h[heads]
        return torch.einsum("...phe,hde->...phd", z, wo)

    def mlp(self, layer: int, resid_mid: Tensor, normed: Tensor | None = None) -> Tensor:
        lw = self.layers[layer]
        x = _rms(resid_mid, lw.ln2, lw.eps2) if normed is None else normed
        return F.linear(self.act(F.linear(x, lw.gate)) * F.linear(x, lw.up), lw.down)

    def unembed_diff(self, resid_last: Tensor, correct: Tensor, incorrect: Tensor) -> Tensor:
        """logit(correct) - logit(incorrect) from the final residual at the read-out position."""
        x = _rms(resid_last, self.ln_f, self.eps_f)
        d = self.w_u[correct] - self.w_u[incorrect]
        out = (x * d).sum(-1)
        if self.b_u is not None:
            out = out + self.b_u[correct] - self.b_u[incorrect]
        return out

    # -- the forward ---------------------------------------------------------------------------
    def forward(
        self,
        h: Tensor,
        rows: Rows,
        start: int = 0,
        stop: int | None = None,
        *,
        edits: Sequence[Any] = (),
        record: dict | None = None,
    ) -> Tensor:
        """Run layers ``[start, stop)`` on the residual ``h`` ``[rows, pos, d]``; returns the residual.

        ``edits`` are interventions of the declared protocol (:mod:`workbench.engine.edits`) at the
        points this forward has: ``QKV`` (queries / keys / values as attention reads them, in the
        protocol's ``[rows, head, pos, d_head]`` layout), ``Z`` (each head's output) and ``MLP_IN``
        (what the MLP reads; the residual goes on unchanged), applied as the attention-hook engine
        applies them (points in layer order, edits at a point in order, conflicts refused); readers
        at ``QKV`` and ``Z`` see the values after the edits. ``record`` (a dict) collects
        ``resid_pre``, ``resid_mid``, ``k``, ``v`` (rotated keys and values as attention used
        them), ``z``, ``attn_out`` and ``mlp_out`` per layer (and ``resid_pre[L]``, the final residual).
        """
        edits = self._checked(edits)
        stop = self.L if stop is None else stop
        for layer in range(start, stop):
            if record is not None:
                record.setdefault("resid_pre", {})[layer] = h
            normed = self.norm1(layer, h)
            q, k, v = (
                self.q_of(layer, normed, rows),
                self.kv_of(layer, normed, rows, "k"),
                self.kv_of(layer, normed, rows, "v"),
            )
            call = self.call(layer, q, k, v, rows)
            q, k, v = self._qkv_point(call, edits)
            z = self.attend(layer, q, k, v, rows)
            z_edits, z_reads = at_point(edits, Point.Z, layer)
            for iv in z_edits:
                z = iv.edit(call, z)
            for reader in z_reads:
                reader.read(call, z)
            a = self.attn_out(layer, z)
            h = h + a
            mlp_in = h
            for iv in at_point(edits, Point.MLP_IN, layer)[0]:
                mlp_in = iv.edit(layer, mlp_in)
            m = self.mlp(layer, mlp_in)
            if record is not None:
                record.setdefault("k", {})[layer] = k
                record.setdefault("v", {})[layer] = v
                record.setdefault("z", {})[layer] = z
                record.setdefault("attn_out", {})[layer] = a
                record.setdefault("resid_mid", {})[layer] = h
                record.setdefault("mlp_out", {})[layer] = m
            h = h + m
        if record is not None and stop == self.L:
            record.setdefault("resid_pre", {})[self.L] = h
        return h

    @staticmethod
    def _checked(edits: Sequence[Any]) -> list[Any]:
        """The edits, flattened, after the protocol's conflict check; points this forward does not
        have (``RESID``, ``SCORES``, ``WEIGHTS``) are refused rather than ignored."""
        check_conflicts(edits)
        flat = flatten(edits)
        missing = sorted({o.point.value for o in flat if getattr(o, "point", None) not in GRAPH_POINTS})
        if missing:
            raise WorkbenchError(
                f"the edge-level graph forward has no {', '.join(missing)} point",
                "edit q/k/v, z or the MLP input here, or run the intervention through the attention-hook engine "
                "(workbench.engine.attention.hooked_run)",
            )
        return flat

    def call(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rows: Rows) -> AttentionCall:
        """Layer ``layer``'s attention as an :class:`~workbench.engine.call.AttentionCall` (the
        protocol's layout, ``[rows, head, pos, d_head]``), what edits at ``QKV`` and ``Z`` receive."""
        return AttentionCall(
            layer=layer,
            module=None,  # type: ignore[arg-type]  # an explicit forward: no HF module
            query=q.transpose(1, 2),
            key=k.transpose(1, 2),
            value=v.transpose(1, 2),
            mask=rows.mask,
            scaling=self.layers[layer].scaling,
            is_causal=False,
        )

    @staticmethod
    def _qkv_point(call: AttentionCall, edits: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
        """The ``QKV`` point: edits in order, then readers; back in this forward's ``[rows, pos, head, d]``."""
        qkv_edits, reads = at_point(edits, Point.QKV, call.layer)
        for iv in qkv_edits:
            call.query, call.key, call.value = iv.edit(call, QKV(call.query, call.key, call.value))
        for reader in reads:
            reader.read(call, QKV(call.query, call.key, call.value))
        return call.query.transpose(1, 2), call.key.transpose(1, 2), call.value.transpose(1, 2)

    def read_out(self, h: Tensor, rows: Rows) -> Tensor:
        return h[torch.arange(h.shape[0], device=h.device), rows.last]

    def logit_diff(
        self,
        batch: BatchInfo,
        last: Tensor,
        correct: Tensor,
        incorrect: Tensor,
        *,
        record: dict | None = None,
        embeds: Tensor | None = None,
        edits: Sequence[Any] = (),
    ) -> Tensor:
        """LD at each row's read-out position from a full explicit forward."""
        rows = self.rows(batch, last)
        h = self.embed(batch.input_ids) if embeds is None else embeds
        if record is not None:
            record["embed"] = h
        h = self.forward(h, rows, record=record, edits=edits)
        return self.unembed_diff(self.read_out(h, rows), correct, incorrect)


GRAPH_POINTS = (Point.QKV, Point.Z, Point.MLP_IN)  # the edit points ModelGraph.forward has


def graph_for(model) -> ModelGraph | None:
    """The model's :class:`ModelGraph` (built once, kept on the model), or None when the
    architecture is not supported (callers then use the attention-hook implementations)."""
    cached = getattr(model, "_circuit_graph", False)
    if cached is False:
        try:
            cached = ModelGraph(model)
        except WorkbenchError:
            cached = None
        model._circuit_graph = cached
    return cached
