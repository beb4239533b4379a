"""DuoAttention gate optimisation on the CPU: one learned gate per (layer, KV head).

DuoAttention (mit-han-lab/duo-attention; Xiao et al., 2024) tells retrieval heads, which need the
whole context, from streaming heads, which do with a few sink tokens and a recent window, by
*optimising* a gate ``alpha`` per KV head. During the optimisation every query head mixes two
attentions over the same queries, keys and values (``duo_attn/patch/llama.py``,
``llama_duo_attention_forward_two_way``)::

    out_h = (1 - alpha) * StreamingAttn_h + alpha * FullAttn_h

where ``alpha`` is the gate of the head's KV head (a GQA group shares it) and ``StreamingAttn`` is
causal attention restricted to the first ``sink`` tokens of the prompt and the last ``recent`` keys
up to and including the query (``duo_attn/patch/streaming_attn.py``, ``generate_streaming_mask``).
The gates start at 1, are clamped to [0, 1] in the forward and in place before every step, and
are the only parameters that learn. The loss (``duo_attn/train.py``) compares the final-norm hidden
states of the gated model with those of the frozen full-attention model on the same input, at the
labelled positions only (the question-and-answer tail of synthetic multi-passkey prompts,
``duo_attn/data.py``, ``MultiplePasskeyRetrievalDataset``)::

    loss = mean over labelled tokens of mean_dim (h_full - h_mixed)^2 + reg_weight * mean |alpha|

with AdamW (weight decay 0) and their LambdaLR schedule (20 % linear warm-up, 20 % linear decay,
floor 0.1 of the learning rate). A high gate after the optimisation marks a head whose long-range
keys the model cannot spare.

Here the mix is a :class:`~workbench.engine.edits.ZEdit` (:class:`DuoMix`): the kernel computes the
full attention as usual, and the edit computes the streaming attention from the call's own queries,
keys and values, by bands of query rows (memory ``O(rows x (sink + recent))`` per head, never the
``T x T`` pattern, so the backward pass fits on a CPU), under the call's mask (padding, positions
counted from each prompt's first real token). The teacher is the same model run without the edit.

CPU scaling (the source trains on 8 GPUs at 1k-32k tokens, sink 128 / recent 256, 2000 steps, 10
passkeys of 32 words): contexts of 1-2k tokens, 4 passkeys of 8 words, sink 16 / recent 64 and 100
steps by default (lr 0.02, reg_weight 0.05 as the source). Gemma-3's sliding-window layers are
already local: they are not gated (``gate_sliding=False``) and their gates are NaN in
:attr:`GateFit.gates`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.engine.attention import hooked_run
from workbench.engine.call import AttentionCall
from workbench.engine.edits import ZEdit
from workbench.engine.frozen import frozen
from workbench.engine.masking import NEG, first_visible_key, named_key_mask
from workbench.engine.patterns import collate
from workbench.errors import WorkbenchError
from workbench.inputs.corpus import corpus_ids
from workbench.inputs.prompts import pad_token_id, special_prefix

# --- synthetic multi-passkey data (duo_attn/data.py, MultiplePasskeyRetrievalDataset) ---------------

NATO = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
ORDINALS = (
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth"
).split()
NEEDLE = "Remeber this sequence of words, it's the {ordinal} passkey to the vault: "  # the source's typo, kept
QUESTION = "Based on the content of the book, what is the {ordinal} passkey to the vault?\nPasskey: "
BOOK_OPEN = " This is a very long story book: <book> "
BOOK_CLOSE = " </book>.\n\n"
SEPARATOR = "\n\n"


@dataclass
class PasskeySample:
    """One multi-passkey prompt: token ids, which positions the loss reads (the QA tail), and
    the passkeys with the depths they were inserted at (fractions of the haystack)."""

    input_ids: list[int]
    labels: list[bool]
    passkeys: list[str]
    depths: list[float]

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_samples(
    tokenizer: Any,
    lengths: Sequence[int] = (1024, 2048),
    n_passkeys: int = 4,
    passkey_words: int = 8,
    seed: int = 0,
    per_length: int = 1,
    min_depth: float = 0.1,
    max_depth: float = 0.9,
    depth_intervals: int = 20,
    needle: str = NEEDLE,
    question: str = QUESTION,
) -> list[PasskeySample]:
    """DuoAttention's multi-passkey prompts, scaled down: ``per_length`` prompts of exactly each
    length (tokens), each a haystack of the shipped prose corpus (a random starting document per
    prompt) with ``n_passkeys`` needles ``needle + passkey`` (``passkey_words`` NATO words),
    wrapped in blank lines, at sorted depths drawn without replacement from
    ``linspace(min_depth, max_depth, depth_intervals)``; then every passkey's question and answer
    in order, ``question + passkey + "\\n\\n"``. The labels (``True``) are the QA tail only, as in
    the source; the prompt starts with the tokenizer's special prefix (BOS for Gemma) and the
    source's book wrapper, without its ``<|im_start|>`` (not a token of every tokenizer)."""
    _check_data(lengths, n_passkeys, passkey_words, per_length, min_depth, max_depth, depth_intervals)
    rng = random.Random(seed)
    prefix = special_prefix(tokenizer) + _encode(tokenizer, BOOK_OPEN)
    close, sep = _encode(tokenizer, BOOK_CLOSE), _encode(tokenizer, SEPARATOR)
    grid = [min_depth + (max_depth - min_depth) * i / max(1, depth_intervals - 1) for i in range(depth_intervals)]
    out = []
    for length in [int(n) for n in lengths for _ in range(per_length)]:
        keys = [" ".join(rng.choice(NATO) for _ in range(passkey_words)) for _ in range(n_passkeys)]
        depths = sorted(rng.sample(grid, n_passkeys))
        needles = [
            _encode(tokenizer, needle.format(ordinal=ORDINALS[i])) + _encode(tokenizer, k) for i, k in enumerate(keys)
        ]
        qa: list[int] = []
        for i, k in enumerate(keys):
            qa += _encode(tokenizer, question.format(ordinal=ORDINALS[i])) + _encode(tokenizer, k) + sep
        fixed = len(prefix) + len(close) + len(qa) + sum(len(sep) * 2 + len(x) for x in needles)
        n_hay = length - fixed
        if n_hay < n_passkeys:
            raise WorkbenchError(
                f"a {length}-token prompt is too short for {n_passkeys} passkeys of {passkey_words} words "
                f"({fixed} tokens without any haystack)",
                "use longer lengths, fewer passkeys (n_passkeys) or shorter ones (passkey_words)",
            )
        hay = corpus_ids(tokenizer, n_hay, rng)
        context, last = [], 0
        for depth, ids in zip(depths, needles):
            cut = int(n_hay * depth)
            context += hay[last:cut] + sep + ids + sep
            last = cut
        context += hay[last:]
        ids = prefix + context + close + qa
        labels = [False] * (len(ids) - len(qa)) + [True] * len(qa)
        out.append(PasskeySample(input_ids=ids, labels=labels, passkeys=keys, depths=depths))
    return out


def _check_data(lengths, n_passkeys, passkey_words, per_length, min_depth, max_depth, depth_intervals) -> None:
    if not len(lengths):
        raise WorkbenchError("no prompt lengths given", "give one or more lengths in tokens, e.g. lengths=(1024, 2048)")
    if min(int(n) for n in lengths) < 1:
        raise WorkbenchError(f"prompt lengths must be positive, got {list(lengths)}", "e.g. lengths=(1024, 2048)")
    if not 1 <= n_passkeys <= len(ORDINALS):
        raise WorkbenchError(f"n_passkeys={n_passkeys} is outside 1..{len(ORDINALS)}", "e.g. n_passkeys=4")
    if passkey_words < 1 or per_length < 1:
        raise WorkbenchError("passkey_words and per_length must be at least 1", "e.g. passkey_words=8, per_length=1")
    if not 0.0 <= min_depth <= max_depth <= 1.0 or depth_intervals < n_passkeys:
        raise WorkbenchError(
            f"depths: need 0 <= min_depth <= max_depth <= 1 and depth_intervals >= n_passkeys "
            f"(got {min_depth}, {max_depth}, {depth_intervals}, {n_passkeys})",
            "e.g. min_depth=0.1, max_depth=0.9, depth_intervals=20",
        )


# --- the mixed attention -------------------------------------------------------------------------

BLOCK_ROWS = 128  # query rows per band of the streaming attention


def streaming_attention(
    call: AttentionCall, sink: int, recent: int, block_rows: int = BLOCK_ROWS
) -> Float[Tensor, "batch query head d_head"]:
    """Causal attention of the call's queries restricted to each prompt's first ``sink`` tokens and
    the last ``recent`` keys up to and including the query (the source's
    ``generate_streaming_mask``), under the call's own mask (padding, window); positions count
    from each prompt's first real key. Computed by bands of ``block_rows`` query rows against the
    sink keys and the band's key window, so memory is ``rows x (sink + recent + block_rows)`` per
    head. Rows that see no key give 0. Float32 inside (float64 for float64 inputs); differentiable."""
    q, k, v = call.query, call.key, call.value
    b, h, n_q, d = q.shape
    n_kv, n_k = k.shape[1], k.shape[2]
    g, off = h // n_kv, n_k - n_q
    dt = torch.promote_types(q.dtype, torch.float32)
    first = first_visible_key(call)  # [b]
    sink_idx = first[:, None] + torch.arange(sink, device=q.device)  # [b, S]
    gather = sink_idx.clamp(0, n_k - 1)[:, None, :, None]
    k_sink = k.gather(2, gather.expand(b, n_kv, sink, d)).to(dt)
    v_sink = v.gather(2, gather.expand(b, n_kv, sink, v.shape[-1])).to(dt)
    outs = []
    for q0 in range(0, n_q, block_rows):
        q1 = min(n_q, q0 + block_rows)
        c = q1 - q0
        lo, hi = max(0, q0 + off - recent + 1), min(n_k, q1 + off)
        window = torch.arange(lo, hi, device=q.device)
        qb = q[:, :, q0:q1].to(dt).reshape(b, n_kv, g, c, d) * call.scaling
        s = torch.cat(
            [qb @ k_sink[:, :, None].transpose(-1, -2), qb @ k[:, :, None, lo:hi].to(dt).transpose(-1, -2)], dim=-1
        ).view(b, h, c, -1)
        vis, add = _band_mask(call, sink_idx, window, first, sink, recent, q0, q1)
        if call.softcap is not None:
            s = call.softcap * torch.tanh(s / call.softcap)
        if add is not None:
            s = s + add.to(dt)
        p = torch.softmax(s.masked_fill(~vis, NEG), dim=-1) * vis
        p = p.view(b, n_kv, g, c, -1)
        o = p[..., :sink] @ v_sink[:, :, None] + p[..., sink:] @ v[:, :, None, lo:hi].to(dt)
        outs.append(o.reshape(b, h, c, -1))
    return torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)


def _band_mask(
    call: AttentionCall,
    sink_idx: Int[Tensor, "batch sink"],
    window: Int[Tensor, " key"],
    first: Int[Tensor, " batch"],
    sink: int,
    recent: int,
    q0: int,
    q1: int,
) -> tuple[Bool[Tensor, "batch mask_head block key"], Float[Tensor, "batch mask_head block key"] | None]:
    """Which of the sink keys, then the band's window keys, queries ``[q0, q1)`` see in streaming
    attention: the call's mask, and for the window the recent rule; window keys that are sink
    tokens are left to the sink part (each key counted once)."""
    b, c = first.shape[0], q1 - q0
    n_k, n_q = call.key.shape[2], call.query.shape[2]
    keys = torch.cat([sink_idx, window[None, :].expand(b, -1)], dim=1)  # [b, S + W]
    allowed, add = named_key_mask(call, keys[:, None, :].expand(b, c, -1), q0, q1)
    at = torch.arange(q0, q1, device=keys.device)[:, None] + (n_k - n_q)  # each query's key index
    dist = at - window[None, :]  # [c, W]
    is_recent = (dist >= 0) & (dist < recent)
    not_sink = (window[None, :] - first[:, None]) >= sink  # [b, W]
    rule = torch.cat(
        [torch.ones(b, c, sink, dtype=torch.bool, device=keys.device), is_recent[None] & not_sink[:, None, :]], dim=-1
    )
    return allowed & rule[:, None], add


class DuoMix(ZEdit):
    """DuoAttention's two-way mix as an edit of each head's output: ``alpha * z + (1 - alpha) *
    streaming``, ``z`` the full attention the kernel computed, ``alpha`` the head's KV-head gate
    from ``gates`` (``[layer, kv_head]``, clamped to [0, 1] here; a GQA group shares it), on the
    ``layers`` given (the gated ones)."""

    label = "DuoAttention gate mix"

    def __init__(
        self, gates: Tensor, layers: Sequence[int], sink: int, recent: int, block_rows: int = BLOCK_ROWS
    ) -> None:
        self.gates, self.layers = gates, frozenset(int(x) for x in layers)
        self.sink, self.recent, self.block_rows = int(sink), int(recent), int(block_rows)

    def sites(self):
        return {layer: None for layer in sorted(self.layers)}

    def edit(self, call: AttentionCall, x: Float[Tensor, "batch query head d_head"]) -> Tensor:
        g = call.n_heads // call.key.shape[1]
        alpha = self.gates[call.layer].clamp(0.0, 1.0).to(x.dtype).repeat_interleave(g)[None, None, :, None]
        stream = streaming_attention(call, self.sink, self.recent, self.block_rows)
        return alpha * x + (1 - alpha) * stream


# --- the objective and the optimisation ---------------------------------------------------------


def gated_layers(model: Any, gate_sliding: bool = False) -> list[int]:
    """The layers whose KV heads get a gate: every layer, or (default) every layer that is not a
    sliding-window layer (Gemma-3's local layers are already streaming-like)."""
    cfg = model.text_config
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * model.n_layers
    return [i for i, t in enumerate(types) if gate_sliding or t != "sliding_attention"]


def lr_lambda(steps: int) -> Callable[[int], float]:
    """The source's schedule factor: ``min(1, max((s+1)/w, 0.1), max((steps-s)/w, 0.1))`` with
    ``w = steps // 5`` (at least 1 here, the source divides by zero below 5 steps)."""
    w = max(1, steps // 5)
    return lambda s: min(1.0, max((s + 1) / w, 0.1), max((steps - s) / w, 0.1))


def final_hidden(model: Any, batch: Any, *edits: Any, grad: bool = False) -> Float[Tensor, "batch pos d_model"]:
    """The final-norm hidden states (the decoder's output, before the LM head) of a collated
    batch, with ``edits`` applied through :func:`hooked_run`."""
    decoder = model.hf_model.get_decoder()
    with hooked_run(model.hf_model, *edits, grad=grad):
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.positions.clamp_min(0),
            use_cache=False,
        )
    return out[0]


def _batch(model: Any, samples: Sequence[PasskeySample]) -> tuple[Any, Bool[Tensor, "batch pos"]]:
    batch = collate([s.input_ids for s in samples], pad_token_id(model.tokenizer), device=model.device)
    labels = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=model.device)
    for i, s in enumerate(samples):
        labels[i, : s.length] = torch.tensor(s.labels, dtype=torch.bool)
    return batch, labels


def duo_loss(
    model: Any,
    samples: Sequence[PasskeySample],
    gates: Tensor,
    layers: Sequence[int],
    sink: int,
    recent: int,
    reg_weight: float,
    teacher: Float[Tensor, "n_labels d_model"] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, distill, reg)`` of DuoAttention on ``samples`` (one right-padded batch):
    ``distill`` = mean over labelled tokens of the per-token mean squared difference of the
    final hidden states, full attention against the gated mix; ``reg`` = mean |alpha| over the
    gated layers' gates; ``loss = distill + reg_weight * reg``. ``teacher``: the full model's
    hidden states at the labelled tokens, in batch order (computed when not given)."""
    batch, labels = _batch(model, samples)
    if teacher is None:
        teacher = final_hidden(model, batch)[labels].float()
    student = final_hidden(model, batch, DuoMix(gates, layers, sink, recent), grad=True)[labels]
    dt = torch.promote_types(student.dtype, torch.float32)
    distill = (teacher.to(dt) - student.to(dt)).pow(2).mean(-1).sum() / labels.sum()
    reg = gates[list(layers)].to(dt).abs().mean()
    return distill + reg_weight * reg, distill, reg


@dataclass
class GateFit:
    """The result of :func:`fit_gates`: ``gates`` ``[n_layers, n_kv_heads]`` (float32, in [0, 1];
    NaN for layers not gated), the loss per step (before the step's update), and the settings."""

    gates: Float[Tensor, "layer kv_head"]
    loss: list[float]
    distill: list[float]
    reg: list[float]
    params: dict[str, Any] = field(default_factory=dict)


def _check_fit(model: Any, steps: int, sink: int, recent: int, lr: float, reg_weight: float, batch_size: int) -> None:
    if steps < 1:
        raise WorkbenchError(f"steps must be at least 1, got {steps}", "e.g. steps=200")
    if sink < 0 or recent < 1:
        raise WorkbenchError(
            f"streaming attention needs sink >= 0 and recent >= 1 (the query itself), got sink={sink}, recent={recent}",
            "e.g. sink=16, recent=64 (the source: 128 / 256 at 1k-32k tokens)",
        )
    if not lr > 0 or reg_weight < 0 or batch_size < 1:
        raise WorkbenchError(
            f"need lr > 0, reg_weight >= 0, batch_size >= 1 (got {lr}, {reg_weight}, {batch_size})",
            "the source uses lr=0.02, reg_weight=0.05, batch_size=1",
        )


def fit_gates(
    model: Any,
    samples: Sequence[PasskeySample] | None = None,
    *,
    lengths: Sequence[int] = (1024, 2048),
    n_passkeys: int = 4,
    passkey_words: int = 8,
    steps: int = 100,
    lr: float = 0.02,
    reg_weight: float = 0.05,
    sink: int = 16,
    recent: int = 64,
    batch_size: int = 1,
    seed: int = 0,
    gate_sliding: bool = False,
    on_step: Callable[[int, float, float, float], None] | None = None,
) -> GateFit:
    """Optimise DuoAttention gates on ``model`` (a :class:`~workbench.models.loading.LoadedModel`)
    for ``steps`` steps of ``batch_size`` prompts, drawn in a seeded shuffled order from
    ``samples`` (default: :func:`passkey_samples` of ``lengths``, ``n_passkeys``,
    ``passkey_words``, ``seed``). Only the gates learn: the model's parameters are frozen for
    the fit and their ``requires_grad`` restored after. The teacher's hidden states are computed
    once per prompt. ``on_step(step, loss, distill, reg)`` is called after each step."""
    _check_fit(model, steps, sink, recent, lr, reg_weight, batch_size)
    if samples is None:
        samples = passkey_samples(model.tokenizer, lengths, n_passkeys, passkey_words, seed)
    if not samples:
        raise WorkbenchError("no samples to fit the gates on", "pass samples= or lengths=")
    too_long = max(s.length for s in samples)
    if too_long > model.n_ctx:
        raise WorkbenchError(
            f"a {too_long}-token prompt exceeds the model's context of {model.n_ctx}", "use shorter lengths"
        )
    layers = gated_layers(model, gate_sliding)
    gates = torch.nn.Parameter(torch.ones(model.n_layers, model.n_kv_heads, device=model.device))
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_lambda(steps))
    order = _order(len(samples), steps * batch_size, seed)
    hist: dict[str, list[float]] = {"loss": [], "distill": [], "reg": []}
    with frozen(model.hf_model):
        teacher = [final_hidden(model, _batch(model, [s])[0])[0, torch.tensor(s.labels)].float() for s in samples]
        for step in range(steps):
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            pick = order[step * batch_size : (step + 1) * batch_size]
            loss, distill, reg = duo_loss(
                model,
                [samples[i] for i in pick],
                gates,
                layers,
                sink,
                recent,
                reg_weight,
                torch.cat([teacher[i] for i in pick]),
            )
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            for key, val in zip(hist, (loss, distill, reg)):
                hist[key].append(val.item())
            if on_step is not None:
                on_step(step, hist["loss"][-1], hist["distill"][-1], hist["reg"][-1])
    out = gates.detach().clamp(0.0, 1.0).float().cpu()
    out[[i for i in range(model.n_layers) if i not in layers]] = math.nan
    settings = dict(
        steps=steps,
        lr=lr,
        reg_weight=reg_weight,
        sink=sink,
        recent=recent,
        batch_size=batch_size,
        seed=seed,
        gate_sliding=gate_sliding,
        gated_layers=layers,
        n_samples=len(samples),
        lengths=sorted({s.length for s in samples}),
        n_passkeys=len(samples[0].passkeys),
        passkey_words=len(samples[0].passkeys[0].split()),
        n_labels=[int(sum(s.labels)) for s in samples],
    )
    return GateFit(gates=out, loss=hist["loss"], distill=hist["distill"], reg=hist["reg"], params=settings)


def _order(n: int, count: int, seed: int) -> list[int]:
    """``count`` sample indices: seeded shuffles of ``range(n)``, one after another (epochs)."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < count:
        perm = list(range(n))
        rng.shuffle(perm)
        out += perm
    return out[:count]


def gates_frame(fit: GateFit, model_name: str):
    """The gated KV heads' gates as a tidy frame: ``model, layer, kv_head, gate`` (layers not
    gated are left out)."""
    import pandas as pd

    rows = [
        (model_name, layer, head, float(fit.gates[layer, head]))
        for layer in range(fit.gates.shape[0])
        for head in range(fit.gates.shape[1])
        if not math.isnan(float(fit.gates[layer, head]))
    ]
    return pd.DataFrame(rows, columns=["model", "layer", "kv_head", "gate"])
