"""Fit head gates in the paper's three stages.

Defaults are the reference's (``CHGTrainer`` / ``CHGAnalyzer.fit`` of ``nam-causal-head-gating``
0.1.0 and the authors' ``chg_trainer.py``): gates from ``U(0, 1)`` as logits, Adam with lr 1.0,
gradient norm clipped at 1.0 (jointly over every initialisation, as the reference clips its one
mask tensor), batches of 32, ``l1_weight`` 0.1, ``l1_clamp`` 4, 500 updates without
regularisation (stage ``none``), then 500 with ``+l1_weight`` (``positive``, G+) and 500 with
``-l1_weight`` (``negative``, G-), both starting from the ``none`` logits with a fresh Adam. One
stream of batches runs through the stages (the reference's single data iterator): epochs of a
seeded shuffle, cut into consecutive batches, the last one of an epoch possibly shorter (a
``DataLoader(shuffle=True)``). Several initialisations (``n_inits``) are fit in the same forward
passes, each prompt repeated once per initialisation.

Without stage ``none`` the regularised stages start from the initial logits. The model's own
parameters are frozen for the fit and restored after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from circuits.gating.gates import HeadGates, check_gateable, init_logits
from circuits.gating.objective import gating_loss
from circuits.gating.tasks import GateExample, check_task
from workbench.engine.frozen import frozen
from workbench.errors import WorkbenchError

STAGES = ("none", "positive", "negative")
SIGN = {"none": 0.0, "positive": 1.0, "negative": -1.0}  # lambda = SIGN * l1_weight


class GateSpec(BaseModel):
    """How gates are fit (every field a parameter; defaults are the paper's)."""

    model_config = ConfigDict(extra="forbid")

    stages: list[str] = Field(list(STAGES), min_length=1, description="none, positive, negative (in this order)")
    updates: int = Field(500, ge=1, description="optimizer updates of stage none")
    reg_updates: int = Field(500, ge=1, description="optimizer updates of each regularised stage")
    n_inits: int = Field(4, ge=1, description="random initialisations fit together")
    batch_size: int = Field(32, ge=1)
    l1_weight: float = Field(0.1, ge=0.0, description="lambda of the regularised stages")
    l1_clamp: float = Field(4.0, gt=0.0, description="logits clamped to +-l1_clamp inside the L1 term")
    lr: float = Field(1.0, gt=0.0, description="Adam learning rate of stage none")
    lr_reg: float = Field(1.0, gt=0.0, description="Adam learning rate of the regularised stages")
    lr_end: float | None = Field(None, gt=0.0, description="linear decay to this rate over stage none (None: constant)")
    lr_reg_end: float | None = Field(None, gt=0.0, description="the same for the regularised stages")
    grad_norm: float | None = Field(1.0, gt=0.0, description="gradient norm clip (None: no clipping)")
    init_low: float = Field(0.0, ge=0.0, le=1.0, description="initial gates ~ U(init_low, init_high)")
    init_high: float = Field(1.0, ge=0.0, le=1.0)
    seed: int = Field(0, ge=0, description="initial gates and the data order")
    padding_side: Literal["right", "left"] = "right"
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="a gate at or above it is open (roles)")

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[str]) -> list[str]:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        return [s for s in STAGES if s in stages]


@dataclass
class GateFit:
    """Fitted gates per stage (``[init, layer, head]``, in [0, 1]), the initial logits, and the
    loss history: one record per update (``stage``, ``update`` from 1, ``nll``, ``l1``, ``loss``;
    the batch's values before the update, as the reference reports them)."""

    gates: dict[str, Float[Tensor, "init layer head"]]
    init: Float[Tensor, "init layer head"]
    history: list[dict[str, Any]]
    spec: GateSpec
    order: list[list[int]] = field(default_factory=list)
    n_examples: int = 0


def batch_order(n: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """``count`` batches of example indices: seeded shuffles of ``range(n)`` one after another,
    each cut into consecutive batches of ``batch_size`` (the last of an epoch may be shorter)."""
    rng = random.Random(f"gate-order-{seed}")
    out: list[list[int]] = []
    while len(out) < count:
        perm = list(range(n))
        rng.shuffle(perm)
        out += [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[:count]


def _optimizer(param: Tensor, lr: float, end: float | None, steps: int):
    opt = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, end / lr, total_iters=steps) if end is not None else None
    return opt, sched


def _stage(
    model: Any,
    examples: Sequence[GateExample],
    start: Tensor,
    stage: str,
    spec: GateSpec,
    batches: Sequence[list[int]],
    log: Callable[[dict[str, Any]], None] | None,
) -> tuple[Tensor, list[dict[str, Any]]]:
    regular = stage != "none"
    lr, end = (spec.lr_reg, spec.lr_reg_end) if regular else (spec.lr, spec.lr_end)
    param = torch.nn.Parameter(start.detach().clone())
    opt, sched = _optimizer(param, lr, end, len(batches))
    weight = SIGN[stage] * spec.l1_weight
    hist = []
    for i, pick in enumerate(batches, 1):
        loss, nll, l1 = gating_loss(model, [examples[j] for j in pick], param, weight, spec.l1_clamp, spec.padding_side)
        loss.backward()
        if spec.grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(param, max_norm=spec.grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        rec = {"stage": stage, "update": i, "nll": nll.item(), "l1": l1.item(), "loss": loss.item()}
        hist.append(rec)
        if log is not None:
            log(rec)
    return param.detach(), hist


def check_edit_point(model: Any, examples: Sequence[GateExample], logits: Tensor, spec: GateSpec) -> None:
    """One forward with the gates, checking the edit ran on every layer (a family whose attention
    bypasses transformers' attention interface would silently leave the heads ungated)."""
    from circuits.gating.objective import target_logp

    gates = HeadGates(logits)
    gates.seen = set()
    target_logp(model, examples[:1], gates, spec.padding_side)
    missing = sorted(set(range(model.n_layers)) - gates.seen)
    if missing:
        raise WorkbenchError(
            f"{model.name}: the head edit point never ran on layers {missing}, so their heads cannot be gated "
            "(their attention bypasses transformers' attention interface)",
            "use a family the workbench supports (Llama/SmolLM2, Gemma, Qwen, Mistral, GPT-2, ...)",
        )


def fit_head_gates(
    model: Any,
    examples: Sequence[GateExample],
    spec: GateSpec | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    init: Float[Tensor, "init layer head"] | None = None,
    order: Sequence[list[int]] | None = None,
) -> GateFit:
    """Fit gates on ``model`` (a :class:`~workbench.models.loading.LoadedModel`) for the task
    ``examples`` under ``spec`` (default :class:`GateSpec`). ``init`` (logits ``[init, layer,
    head]``) and ``order`` (the batches, as index lists) replace the seeded ones, for comparisons
    with another implementation on the same start and data. ``log(record)`` after every update."""
    spec = spec or GateSpec()
    check_gateable(model)
    check_task(examples, model.n_ctx)
    if spec.init_low > spec.init_high:
        raise WorkbenchError(
            f"init_low {spec.init_low} is above init_high {spec.init_high}", "the paper uses U(0, 1): 0 and 1"
        )
    n_updates = (spec.updates if "none" in spec.stages else 0) + spec.reg_updates * sum(
        s != "none" for s in spec.stages
    )
    order = list(order) if order is not None else batch_order(len(examples), spec.batch_size, n_updates, spec.seed)
    if len(order) < n_updates:
        raise WorkbenchError(f"{len(order)} batches given for {n_updates} updates", "give one batch per update")
    if init is None:
        init = init_logits(spec.n_inits, model.n_layers, model.n_heads, (spec.init_low, spec.init_high), spec.seed)
    init = init.to(model.device, torch.promote_types(model.dtype, torch.float32))
    gates: dict[str, Tensor] = {}
    history: list[dict[str, Any]] = []
    with frozen(model.hf_model):
        check_edit_point(model, examples, init, spec)
        start, used = init, 0
        for stage in spec.stages:
            steps = spec.updates if stage == "none" else spec.reg_updates
            logits, hist = _stage(model, examples, start, stage, spec, order[used : used + steps], log)
            used += steps
            history += hist
            if stage == "none":
                start = logits
            gates[stage] = torch.sigmoid(logits).float().cpu()
    return GateFit(gates=gates, init=init.float().cpu(), history=history, spec=spec, order=[list(b) for b in order],
                   n_examples=len(examples))  # fmt: skip
