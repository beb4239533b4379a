"""The gating objective: target log-probability under the gates, minus the clamped-logit L1 term.

Per the reference trainer (``CHGTrainer._get_loss``, ``CHG.get_logp(agg="mean")``)::

    nll  = - mean over (prompt, init) of [ mean over the prompt's target tokens of log p(target | prefix; G) ]
    L1   = lambda * mean over (init, layer, head) of clamp(logit, -l1_clamp, l1_clamp)
    loss = nll - L1

``lambda = 0`` (stage ``none``), ``+l1_weight`` (``positive``: the subtracted term rewards open
gates, G+) or ``-l1_weight`` (``negative``: rewards closed gates, G-). The paper writes the same
loss as ``-sum log P(y|x; G) - lambda sum sigma^-1(G)`` (the inverse sigmoid clipped).

Only the positions that predict a target token go through the unembedding (the reference
computes the logits of every position), so a 262k-token vocabulary (Gemma-3) costs
``targets x vocab``, not ``tokens x vocab``. Batches are padded on either side; positions count
from each prompt's first real token, so padding changes nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.baseline import final_softcap
from circuits.gating.gates import HeadGates
from circuits.gating.tasks import GateExample
from workbench.engine.attention import hooked_run
from workbench.engine.call import base_network
from workbench.engine.patterns import collate
from workbench.inputs.prompts import pad_token_id


def target_logp(
    model: Any,
    examples: Sequence[GateExample],
    gates: HeadGates | None = None,
    padding_side: str = "right",
    edits: Sequence[Any] = (),
    grad: bool = False,
) -> Float[Tensor, "prompt init"]:
    """Mean log-probability of each example's target tokens, per gate initialisation (one column
    when ``gates`` is None), on one padded batch. The model reads ``ids[:-1]`` (the last target
    token is never an input); ``edits``: further interventions (head ablations) in the same run."""
    k = 1 if gates is None else gates.logits.shape[0]
    inputs = [list(ex.ids[:-1]) for ex in examples]
    batch = collate(inputs, pad_token_id(model.tokenizer), model.device, padding_side=padding_side)
    rep = lambda x: x.repeat_interleave(k, dim=0)  # noqa: E731  rows (prompt, init)
    width = batch.input_ids.shape[1]
    rows, cols, tgt = [], [], []
    for b, ex in enumerate(examples):
        n = len(ex.ids) - 1
        start = width - n if padding_side == "left" else 0
        for j in range(ex.n_target):  # target token j sits at ids[n + 1 - n_target + j], read from the position before
            pos = start + n - ex.n_target + j
            for i in range(k):
                rows.append(b * k + i)
                cols.append(pos)
                tgt.append(ex.ids[n + 1 - ex.n_target + j])
    dev = model.device
    observers = ([] if gates is None else [gates]) + list(edits)
    with hooked_run(model.hf_model, *observers, grad=grad):
        hidden = base_network(model.hf_model)(
            input_ids=rep(batch.input_ids),
            attention_mask=rep(batch.attention_mask),
            position_ids=rep(batch.positions).clamp_min(0),
            use_cache=False,
        ).last_hidden_state
        h = hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
        logits = final_softcap(model.hf_model, model.hf_model.get_output_embeddings()(h))
        dt = torch.promote_types(logits.dtype, torch.float32)
        logp = torch.log_softmax(logits.to(dt), dim=-1).gather(1, torch.tensor(tgt, device=dev)[:, None])[:, 0]
        per_row = torch.zeros(len(examples) * k, dtype=dt, device=dev).index_add(
            0, torch.tensor(rows, device=dev), logp
        )
        counts = torch.tensor([ex.n_target for ex in examples], dtype=dt, device=dev).repeat_interleave(k)
        return (per_row / counts).view(len(examples), k)


def l1_term(logits: Float[Tensor, "init layer head"], weight: float, clamp: float) -> Tensor:
    """``weight * mean(clamp(logits, -clamp, clamp))`` (0 when ``weight`` is 0)."""
    if weight == 0:
        return torch.zeros((), dtype=logits.dtype, device=logits.device)
    return weight * logits.clamp(-clamp, clamp).mean()


def gating_loss(
    model: Any,
    examples: Sequence[GateExample],
    logits: Float[Tensor, "init layer head"],
    weight: float,
    clamp: float = 4.0,
    padding_side: str = "right",
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, nll, l1)`` on one batch: ``loss = nll - l1`` (module docstring), differentiable in
    ``logits``."""
    logp = target_logp(model, examples, HeadGates(logits), padding_side, grad=True)
    nll = -logp.mean()
    l1 = l1_term(logits, weight, clamp).to(nll.dtype)
    return nll - l1, nll, l1
