"""Head-output divergence between two conditions: the engine behind ``vhd`` and ``context``.

For an item with a condition (image, context passage) and its counterfactual, the divergence of
head (layer, head) at generation step t is

    D[t, l, h] = || z[l, h](y_t | y_<t, condition, text) - z[l, h](y_t | y_<t, text) ||_2

where z is the head's output (after attention, before W_O) at the position that predicts y_t,
and y_1..y_T are the tokens the model generates greedily *with* the condition (He et al. 2025,
VHD). Instead of decoding twice with a KV cache, we decode once (with the condition) and then run
*one* teacher-forced forward per condition over prompt + y_<T: the position predicting y_t is
``len(prompt) - 1 + t`` in both, so all steps of all items come out of two batched forwards.

Batches are left-padded (the steps of every row then sit in the last columns, so only those
columns' logits are computed) with explicit ``position_ids`` from the attention mask, so a
padded row computes what it computes alone. Head outputs are captured inside the attention hook
(:mod:`workbench.engine.attention`) at those columns only; nothing of size ``[query, key]`` is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall
from workbench.engine.edits import ZReader
from workbench.engine.masking import attention_probs
from workbench.errors import WorkbenchError
from workbench.inputs.conditions import TOKEN_ALIGNED, Condition, check_lengths
from workbench.inputs.prompts import pad_token_id
from workbench.models.device import run_halving_on_oom
from workbench.protocol.probes import DivergenceProbe, Probe
from workbench.protocol.run_context import RunContext


@dataclass
class HeadOutputs:
    """What one condition's forward gives at the T generation steps of one item."""

    z: Float[Tensor, "step layer head d_head"]
    condition_attention: Float[Tensor, "step layer head"]  # attention mass on the condition's tokens
    top_token: Int[Tensor, " step"]  # the greedy next token at each step
    resid: Float[Tensor, "step d_model"] | None = None  # input of the final norm (keep_resid=True)
    modules: list | None = None  # each layer's attention module (for its output projection)


def left_padded_inputs(
    rows: Sequence[Condition],
    suffixes: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, Tensor], Bool[Tensor, "batch pos"]]:
    """Left-pad ``rows[i] + suffixes[i]`` into model inputs (with ``position_ids``) and the
    condition-token mask of the batch; floating inputs (pixel values) cast to ``dtype``."""
    lengths = [len(r) + len(s) for r, s in zip(rows, suffixes)]
    width = max(lengths)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    cond = torch.zeros((b, width), dtype=torch.bool)
    aligned: dict[str, Tensor] = {}
    stacked: dict[str, list[Tensor]] = {}
    for i, (row, suf) in enumerate(zip(rows, suffixes)):
        start = width - lengths[i]
        full = list(row.input_ids) + list(suf)
        ids[i, start:] = torch.tensor(full, dtype=torch.long)
        mask[i, start:] = 1
        if row.condition_mask:
            cond[i, start : start + len(row)] = torch.tensor(row.condition_mask, dtype=torch.bool)
        for key, val in row.extras.items():
            if key in TOKEN_ALIGNED:
                if key not in aligned:
                    aligned[key] = torch.zeros((b, width), dtype=val.dtype)
                aligned[key][i, start : start + len(row)] = val
            else:
                stacked.setdefault(key, []).append(val)
    inputs: dict[str, Tensor] = {"input_ids": ids, "attention_mask": mask, **aligned}
    for key, vals in stacked.items():
        inputs[key] = torch.cat(vals, dim=0)
    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in inputs.items()}
    return {k: v.to(device, non_blocking=True) for k, v in cast.items()}, cond.to(device)


def _uses_own_positions(hf_model: Any) -> bool:
    """Multimodal RoPE families (Qwen-VL) compute their own 3-D positions; never pass ours."""
    return any(hasattr(m, "get_rope_index") for m in (hf_model, getattr(hf_model, "model", None)) if m is not None)


class _CaptureSteps(ZReader):
    """Observer: every head's z at the last ``n_steps`` columns, and its attention mass on the
    condition's tokens there (the attention rows of those queries only)."""

    def __init__(self, n_layers: int, n_steps: int, condition_keys: Bool[Tensor, "batch key"]) -> None:
        self.n_steps = n_steps
        self.condition_keys = condition_keys
        self.z: list[Tensor | None] = [None] * n_layers
        self.attn: list[Tensor | None] = [None] * n_layers
        self.modules: list[Any] = [None] * n_layers

    def read(self, call: AttentionCall, z: Float[Tensor, "batch query head d_head"]) -> None:
        self.z[call.layer] = z[:, -self.n_steps :].detach().float()
        self.modules[call.layer] = call.module
        probs = attention_probs(call, self.n_steps)
        keys = self.condition_keys[:, : probs.shape[-1]].float()
        self.attn[call.layer] = torch.einsum("bhtk,bk->bth", probs, keys)


def head_outputs(
    model: Any,
    rows: Sequence[Condition],
    suffixes: Sequence[Sequence[int]],
    n_steps: Sequence[int],
    ctx: RunContext | None = None,
    observers: Iterable[Any] = (),
    keep_resid: bool = False,
) -> list[HeadOutputs]:
    """Teacher-forced forward of ``rows[i] + suffixes[i]``; head outputs at the last
    ``n_steps[i]`` positions of each row (the positions that predict the generated tokens), and
    with ``keep_resid`` the residual stream entering the final norm there."""
    hf = model.hf_model
    ctx = ctx or RunContext()
    observers = [*ctx.interventions, *observers]
    pad = pad_token_id(model.tokenizer)
    out: list[HeadOutputs | None] = [None] * len(rows)
    own_positions = _uses_own_positions(hf)

    def run(idx: list[int]) -> None:
        inputs, cond = left_padded_inputs(
            [rows[i] for i in idx], [suffixes[i] for i in idx], pad, model.device, model.dtype
        )
        if own_positions:
            inputs.pop("position_ids")
        t_max = max(n_steps[i] for i in idx)
        cap = _CaptureSteps(model.n_layers, t_max, cond)
        resid: list[Tensor] = []
        handle = (
            final_norm(hf).register_forward_pre_hook(
                lambda mod, args: resid.append(args[0][:, -t_max:].detach().float())
            )
            if keep_resid
            else None
        )
        try:
            with hooked_run(hf, *observers, cap):
                logits = hf(**inputs, logits_to_keep=t_max, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()
        z = torch.stack(cap.z, dim=2)  # [batch, step, layer, head, d_head]
        attn = torch.stack(cap.attn, dim=2)  # [batch, step, layer, head]
        top = logits.argmax(-1)
        for j, i in enumerate(idx):
            t = n_steps[i]
            out[i] = HeadOutputs(
                z[j, t_max - t :].cpu(),
                attn[j, t_max - t :].double().cpu(),
                top[j, t_max - t :].cpu(),
                resid[0][j, t_max - t :].cpu() if resid else None,
                list(cap.modules),
            )

    batches = ctx.plan([len(r) + len(s) for r, s in zip(rows, suffixes)], model.device)
    run_halving_on_oom(batches, run, model.device, lambda i: _too_big(len(rows[i]) + len(suffixes[i])))
    return out  # type: ignore[return-value]


def _too_big(n_tokens: int) -> WorkbenchError:
    return WorkbenchError(
        f"out of memory on a single item of {n_tokens} tokens",
        "use --dtype bfloat16, fewer --max-new-tokens, or shorter items",
    )


def final_norm(hf_model: Any) -> torch.nn.Module:
    """The norm applied to the residual stream before the unembedding."""
    decoder = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        mod = getattr(decoder, name, None)
        if isinstance(mod, torch.nn.Module):
            return getattr(mod, "original_component", None) or mod
    raise ValueError(f"cannot find the final norm of {type(hf_model).__name__}")


def output_projection(attention_module: Any) -> torch.nn.Module:
    """The W_O of an HF attention module (o_proj, c_proj, out_proj or dense)."""
    for name in ("o_proj", "c_proj", "out_proj", "dense"):
        mod = getattr(attention_module, name, None)
        if isinstance(mod, torch.nn.Module):
            return getattr(mod, "original_component", None) or mod
    raise ValueError(f"cannot find the output projection of {type(attention_module).__name__}")


def head_contributions(attention_module: Any, z: Float[Tensor, "head d_head"]) -> Float[Tensor, "head d_model"]:
    """Each head's write to the residual stream, z_h W_O[h] (bias excluded)."""
    proj = output_projection(attention_module)
    h, d = z.shape
    w = next(proj.parameters())
    blocks = torch.zeros(h + 1, h * d, dtype=w.dtype, device=w.device)
    for i in range(h):
        blocks[i, i * d : (i + 1) * d] = z[i].to(w.dtype)
    with torch.no_grad():
        out = proj(blocks)
    return (out[:h] - out[h]).float()


def greedy_continuations(
    model: Any,
    rows: Sequence[Condition],
    max_new_tokens: int,
    ctx: RunContext | None = None,
    observers: Iterable[Any] = (),
) -> list[list[int]]:
    """Greedy decoding (KV cache, batched, left-padded) of each row; tokens up to and including
    the first end-of-sequence token."""
    hf = model.hf_model
    ctx = ctx or RunContext()
    observers = [*ctx.interventions, *observers]
    pad = pad_token_id(model.tokenizer)
    eos = _eos_ids(model)
    out: list[list[int]] = [[] for _ in rows]

    def run(idx: list[int]) -> None:
        inputs, _ = left_padded_inputs([rows[i] for i in idx], [[] for _ in idx], pad, model.device, model.dtype)
        inputs.pop("position_ids")  # generate() derives positions from the attention mask
        width = inputs["input_ids"].shape[1]
        with hooked_run(hf, *observers):
            seq = hf.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=sorted(eos) or None,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        for j, i in enumerate(idx):
            toks = seq[j, width:].tolist()
            cut = next((n + 1 for n, t in enumerate(toks) if t in eos), len(toks))
            out[i] = toks[:cut]

    batches = ctx.plan([len(r) + max_new_tokens for r in rows], model.device)
    run_halving_on_oom(batches, run, model.device, lambda i: _too_big(len(rows[i])))
    return out


def _eos_ids(model: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model.hf_model, "generation_config", None), model.tokenizer):
        val = getattr(src, "eos_token_id", None)
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, (list, tuple)):
            ids.update(int(v) for v in val)
    return ids


@dataclass
class Divergence:
    """Per item: the steps' tokens and the per-head divergence and attention at each step."""

    id: str
    tokens: list[int]  # y_1..y_T (generated with the condition)
    divergence: Float[Tensor, "step layer head"]
    condition_attention: Float[Tensor, "step layer head"]
    cond_z: Float[Tensor, "step layer head d_head"] | None = None  # kept only with keep_z=True
    base_z: Float[Tensor, "step layer head d_head"] | None = None
    cond_resid: Float[Tensor, "step d_model"] | None = None  # kept only with keep_resid=True
    modules: list | None = None


def divergence(
    model: Any,
    pairs: Sequence[Any],
    steps: str = "first",
    max_new_tokens: int = 16,
    ctx: RunContext | None = None,
    observers: Iterable[Any] = (),
    keep_z: bool = False,
    keep_resid: bool = False,
) -> list[Divergence]:
    """Per-head output divergence between each pair's condition and counterfactual.

    Args:
        model: a :class:`~workbench.models.loading.LoadedModel`.
        pairs: :class:`~workbench.inputs.conditions.ConditionPair` s.
        steps: ``"first"`` (the position that generates the first token; no decoding needed) or
            ``"all"`` (every token of the greedy answer with the condition, up to
            ``max_new_tokens`` and the first end-of-sequence token).
        ctx: batching (``auto``: a padded-token budget) and interventions active in every forward.
        observers: further attention observers active in every forward (e.g. head scaling).
        keep_z: also return the head outputs themselves (``[step, layer, head, d_head]`` per
            item and condition; off by default, the distances are what is reduced).
    """
    if steps not in ("first", "all"):
        raise ValueError(f"steps must be 'first' or 'all', got {steps!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    observers = list(observers)
    conds = [p.cond for p in pairs]
    bases = [p.base for p in pairs]
    if steps == "all":
        gen = greedy_continuations(model, conds, max_new_tokens, ctx, observers)
        suffixes = [g[:-1] for g in gen]
        n_steps = [len(g) for g in gen]
    else:
        suffixes = [[] for _ in pairs]
        n_steps = [1] * len(pairs)
    with_c = head_outputs(model, conds, suffixes, n_steps, ctx, observers, keep_resid=keep_resid)
    without = head_outputs(model, bases, suffixes, n_steps, ctx, observers)
    out = []
    for i, (p, a, b, n) in enumerate(zip(pairs, with_c, without, n_steps)):
        tokens = gen[i] if steps == "all" else a.top_token.tolist()
        out.append(
            Divergence(
                id=p.id,
                tokens=list(tokens)[:n],
                divergence=(a.z.double() - b.z.double()).norm(dim=-1),
                condition_attention=a.condition_attention,
                cond_z=a.z if keep_z else None,
                base_z=b.z if keep_z else None,
                cond_resid=a.resid,
                modules=a.modules if keep_resid else None,
            )
        )
    return out


def measure(
    probe: DivergenceProbe, model: Any, items: Sequence[Any], ctx: RunContext, **keep: bool
) -> list[Divergence]:
    """What every divergence probe's run starts with: each item's pair (the probe's ``pairs``:
    with / without its image or context), the length check, and :func:`divergence` with the
    probe's ``steps`` and ``max_new_tokens`` (``keep``: ``keep_z``, ``keep_resid``)."""
    p = probe.options
    pairs = probe.pairs(model, items, ctx.root)
    check_lengths(pairs, model.n_ctx, p.max_new_tokens if p.steps == "all" else 0)
    return divergence(model, pairs, steps=p.steps, max_new_tokens=p.max_new_tokens, ctx=ctx, **keep)


def divergence_rows(
    probe: Probe, model: Any, outcomes: Sequence[Divergence], metric: str, attention_metric: str
) -> list[pd.DataFrame]:
    """Per-head means over every (item, step), and the attention mass on the condition."""
    n = sum(o.divergence.shape[0] for o in outcomes)
    if n == 0:
        nan = torch.full((model.n_layers, model.n_heads), float("nan"), dtype=torch.float64)
        return [probe.rows(metric, nan, 0), probe.rows(attention_metric, nan, 0)]
    div = torch.cat([o.divergence for o in outcomes]).double()
    attn = torch.cat([o.condition_attention for o in outcomes]).double()
    return [probe.rows(metric, div.mean(0), n), probe.rows(attention_metric, attn.mean(0), n)]
