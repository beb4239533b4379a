"""The head-level hook point: an attention implementation that lets observers see every head.

TransformerLens' bridge re-implements attention eagerly so that ``hook_pattern`` can fire;
that materialises ``[batch, head, query, key]`` for every layer and costs 2x the forward's
time and 2.7x its memory at 4 x 512 tokens, and 17x the memory at 4096 (README, Benchmark).
We instead register a transformers attention implementation, ``"workbench"``, which

1. computes the layer's output with PyTorch SDPA (flash / memory-efficient kernels where the
   device has them), exactly as ``attn_implementation="sdpa"`` would, and
2. hands the *same* post-RoPE queries, keys, values, mask and scaling the kernel used to the
   active observers (probes), which reduce what they need chunk by chunk over query positions
   (:mod:`workbench.engine.patterns`) so memory stays linear in sequence length,
3. computes the output with a fused kernel that also returns each row's log-sum-exp when an
   observer asks for it (``wants_statistics(call)`` -> ``{"lse"}`` or ``{"lse", "key_mean"}``;
   :mod:`workbench.engine.kernels`), so statistics of named keys and row entropies cost next to
   nothing over the forward (:mod:`workbench.engine.statistics`),
4. lets observers edit the per-head output ``z`` (``[batch, query, head, d_head]``, before
   ``W_O``) for interventions, and the queries / keys / values before the kernel (path
   patching into receiver heads).

:func:`native_attention` swaps the bridge's attention components back to the original HF
modules for the duration of a run; every other bridge hook (residual stream, MLP, ...) still
fires, except in the pattern engine's runs, which unwrap every bridge component nobody hooked
(``unwrap=True``: nothing there reads them, and the wrappers cost ~2% of a short forward).
Because the hook sits at the attention-function seam, it works for every architecture
transformers implements with the attention interface (Llama, Qwen, Gemma, Mistral, GPT-2, ...).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from workbench.engine.call import AttentionCall, current_observers, observe
from workbench.engine.edits import QKV, Point, at_point, check_conflicts, edited_attention, flatten
from workbench.engine.kernels import attention_with_statistics, fusable
from workbench.engine.masking import attention_probs
from workbench.errors import WorkbenchError

ATTN_IMPL = "workbench"


def _eager_output(call: AttentionCall) -> Tensor:
    """Plain attention output for the cases SDPA cannot do (logit soft-capping)."""

    v = call.value.repeat_interleave(call.query.shape[1] // call.value.shape[1], dim=1)
    p = attention_probs(call).to(v.dtype)
    return (p @ v).transpose(1, 2).contiguous()


def _fusable(call: AttentionCall, dropout: float, kwargs: dict[str, Any]) -> bool:

    return fusable(call, dropout, kwargs)


def _qkv_point(call: AttentionCall, observers: list[Any]) -> None:
    """The ``QKV`` point: interventions replace the queries / keys / values the kernel reads (in
    order), then readers see them."""
    edits, reads = at_point(observers, Point.QKV, call.layer)
    for iv in edits:
        call.query, call.key, call.value = iv.edit(call, QKV(call.query, call.key, call.value))
    for reader in reads:
        reader.read(call, QKV(call.query, call.key, call.value))


def _wanted_statistics(call: AttentionCall, observers: list[Any]) -> set[str]:
    """What the observers ask the kernel to return beside the output (``"lse"``, ``"key_mean"``)."""
    wants: set[str] = set()
    for obs in observers:
        ask = getattr(obs, "wants_statistics", None)
        if ask is not None:
            wants.update(ask(call))
    return wants


def workbench_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention interface: SDPA output, plus the observers' view of the heads and
    the interventions' edits (:mod:`workbench.engine.edits`), point by point."""
    scaling = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    softcap = kwargs.pop("softcap", None)
    kwargs.pop("output_attentions", None)
    call = AttentionCall(
        layer=int(getattr(module, "layer_idx", -1) if getattr(module, "layer_idx", None) is not None else -1),
        module=module,
        query=query,
        key=key,
        value=value,
        mask=attention_mask,
        scaling=scaling,
        # torch SDPA applies is_causal only when there is no mask and more than one query.
        is_causal=causal and attention_mask is None and query.shape[2] > 1,
        softcap=softcap,
    )
    observers = flatten(current_observers()) if call.layer >= 0 else []  # only decoder layers are heads we index
    _qkv_point(call, observers)
    z_edits, z_reads = at_point(observers, Point.Z, call.layer)
    z = _output(call, observers, z_edits, dropout, kwargs, is_causal)
    for iv in z_edits:
        z = iv.edit(call, z)
    for reader in z_reads:
        reader.read(call, z)
    for obs in observers:
        hook = getattr(obs, "on_attention", None)  # pattern observers (probes) read the call
        if hook is not None:
            hook(call)
    return z, None


def _output(
    call: AttentionCall,
    observers: list[Any],
    z_edits: list[Any],
    dropout: float,
    kwargs: dict[str, Any],
    is_causal: bool | None,
) -> Float[Tensor, "batch query head d_head"]:
    """The kernel: skipped when one of the layer's ``Z`` edits (``z_edits``) replaces every
    head's output, eager over blocks of rows when the layer has ``SCORES``/``WEIGHTS`` edits,
    SDPA (or the fused kernel with statistics an observer asked for) otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = call.query, call.key, call.value
    if any(iv.replaces(call) for iv in z_edits):
        # path patching freezes every head's output: the kernel's result would be overwritten
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    scores = at_point(observers, Point.SCORES, call.layer)[0]
    weights = at_point(observers, Point.WEIGHTS, call.layer)[0]
    if scores or weights:
        return edited_attention(call, scores, weights)
    if call.softcap is not None:
        return _eager_output(call)
    wants = _wanted_statistics(call, observers)
    if wants and _fusable(call, dropout, kwargs):
        z, call.lse, call.key_mean = attention_with_statistics(call, key_mean="key_mean" in wants)
        return z
    z, _ = sdpa_attention_forward(
        call.module, query, key, value, call.mask, dropout=dropout, scaling=call.scaling, is_causal=is_causal, **kwargs
    )
    return z


def register() -> None:
    """Register ``"workbench"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, workbench_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPL, sdpa_mask)


def _configs(model: torch.nn.Module, modules: list[torch.nn.Module]) -> list[Any]:
    """The configs whose attention implementation decides the *language model's* layers.

    A VLM's vision tower keeps its own implementation: its layers are not the decoder's heads
    (probes index layers by the decoder's ``layer_idx``), and observers must not see them.
    """
    from transformers import PretrainedConfig

    top = getattr(model, "config", None)
    vision = {id(getattr(top, "vision_config", None))} if top is not None else set()
    seen: dict[int, Any] = {}
    for mod in modules:
        cfg = vars(mod).get("config")  # not getattr: a module's missing attribute costs a raised AttributeError
        if isinstance(cfg, PretrainedConfig) and id(cfg) not in vision:
            if getattr(cfg, "vision_config", None) is not None:
                vision.add(id(cfg.vision_config))
                text = cfg.get_text_config()
                seen.setdefault(id(text), text)
                if text is not cfg:
                    seen.setdefault(id(cfg), cfg)
                continue
            seen.setdefault(id(cfg), cfg)
    return [cfg for key, cfg in seen.items() if key not in vision]


def _hooked(component: torch.nn.Module, hooked: set[int]) -> bool:
    """Whether a hook is registered on what unwrapping ``component`` takes out of the forward:
    the wrapper itself and its hook points (not the HF module it wraps, which runs either way,
    nor wrappers nested in it, decided on their own), given the ids of the modules that carry
    somebody's hook (``hooked``, :func:`_hooked_modules`)."""
    if not hooked:
        return False
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    stack = [component]
    while stack:
        m = stack.pop()
        if id(m) in hooked:
            return True
        for name, child in m.named_children():
            if name != "_original_component" and not isinstance(child, GeneralizedComponent):
                stack.append(child)
    return False


def _hooked_modules(modules: list[torch.nn.Module]) -> set[int]:
    """Ids of the modules carrying a hook other than the bridge's plumbing: the hooks
    TransformerLens' blocks register on their own submodules at their first forward
    (``_capture_hook_handles``), wiring between wrappers, not somebody's hook. One pass over the
    modules, so a run without hooks (the pattern engine's) checks no component further."""
    internal = {h.id for m in modules for h in vars(m).get("_capture_hook_handles", ())}
    return {
        id(m)
        for m in modules
        if any(
            set(d) - internal
            for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        )
    }


@contextlib.contextmanager
def native_attention(hf_model: torch.nn.Module, unwrap: bool = False) -> Iterator[torch.nn.Module]:
    """Run ``hf_model`` with the original HF attention modules and the ``"workbench"`` kernel.

    ``unwrap``: swap every other bridge component (blocks, MLPs, norms, embeddings) whose hook
    points carry no hook for the HF module it wraps as well, so the forward is the plain HF
    model's: each wrapper costs a Python call and two identity hook points per module, ~2% of a
    short forward (SmolLM2, 1024 tokens). For runs whose only observers are attention observers
    (the pattern engine); runs that add torch hooks to the bridge's modules after entering
    (patching, residual capture) keep them. A component someone already hooked stays wrapped.

    Restores the bridge's components and the previous attention implementation on exit,
    whatever happens inside.
    """
    register()
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    modules = list(hf_model.modules())  # one walk of the module tree serves every step below
    configs = _configs(hf_model, modules)
    # set on each config itself: the property setter would recurse into a VLM's vision config
    previous = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    wrapped = "transformer_lens" in sys.modules  # else no bridge was booted: nothing is wrapped
    hooked = _hooked_modules(modules) if unwrap and wrapped else set()
    try:
        if wrapped:
            from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
            from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
        for parent in modules if wrapped else ():
            for cname, child in list(parent.named_children()):
                original = child.original_component if isinstance(child, GeneralizedComponent) else None
                if original is None:
                    continue
                if isinstance(child, AttentionBridge) or (
                    unwrap and isinstance(child, GeneralizedComponent) and not _hooked(child, hooked)
                ):
                    swaps.append((parent, cname, child))
                    setattr(parent, cname, original)
        for cfg in configs:
            cfg._attn_implementation_internal = ATTN_IMPL
        yield hf_model
    finally:
        for cfg, impl in previous:
            cfg._attn_implementation_internal = impl
        for parent, cname, child in reversed(swaps):
            setattr(parent, cname, child)


def decoder_layers(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers, in order (the modules whose attention carries a
    ``layer_idx``; a VLM's vision tower is not among them)."""
    for mod in hf_model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod):
            first = getattr(mod[0], "original_component", None) or mod[0]
            attn = getattr(first, "self_attn", None) or getattr(first, "attn", None)
            attn = getattr(attn, "original_component", None) or attn
            if getattr(attn, "layer_idx", None) is not None:
                return list(mod)
    return []


@contextlib.contextmanager
def resid_edits(hf_model: torch.nn.Module) -> Iterator[None]:
    """The ``RESID`` point: a forward pre-hook on each decoder layer hands the residual stream
    entering it to the ``RESID`` interventions (in order), then readers, of the current run."""

    def pre(module, args, kwargs, layer: int):
        edits, reads = at_point(flatten(current_observers()), Point.RESID, layer)
        if not edits and not reads:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        for iv in edits:
            x = iv.edit(layer, x)
        for reader in reads:
            reader.read(layer, x)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handles = [
        block.register_forward_pre_hook(lambda m, a, k, layer=i: pre(m, a, k, layer), with_kwargs=True)
        for i, block in enumerate(decoder_layers(hf_model))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2")  # the norm an MLP reads through


def mlp_norms(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's norm in front of its MLP (Gemma: ``pre_feedforward_layernorm``;
    Llama: ``post_attention_layernorm``; GPT-2: ``ln_2``): its input is what the MLP block reads."""
    out = []
    for i, block in enumerate(decoder_layers(hf_model)):
        block = getattr(block, "original_component", None) or block
        norm = next((getattr(block, n) for n in MLP_NORMS if hasattr(block, n)), None)
        if norm is None:
            raise WorkbenchError(
                f"cannot find the norm in front of layer {i}'s MLP ({type(block).__name__})",
                "MLP_IN edits work on Llama-, Gemma- and GPT-2-like layers; edit RESID instead",
            )
        out.append(norm)
    return out


@contextlib.contextmanager
def mlp_in_edits(hf_model: torch.nn.Module) -> Iterator[None]:
    """The ``MLP_IN`` point: a forward pre-hook on each layer's MLP norm hands its input (the
    residual after attention) to the ``MLP_IN`` interventions; the residual itself is not touched."""

    def pre(module, args, layer: int):
        edits, _ = at_point(flatten(current_observers()), Point.MLP_IN, layer)
        if not edits:
            return None
        x = args[0]
        for iv in edits:
            x = iv.edit(layer, x)
        return (x, *args[1:])

    norms = mlp_norms(hf_model)
    handles = [norm.register_forward_pre_hook(lambda m, a, layer=i: pre(m, a, layer)) for i, norm in enumerate(norms)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def hooked_run(
    hf_model: torch.nn.Module, *observers: Any, grad: bool = False, unwrap: bool = False
) -> Iterator[torch.nn.Module]:
    """The one way a run is set up: grad mode, native attention (``unwrap``: the plain HF
    modules throughout, :func:`native_attention`), then the observers and interventions, whose
    conflicts are refused before anything runs (:func:`workbench.engine.edits.check_conflicts`)."""
    with torch.enable_grad() if grad else torch.no_grad(), native_attention(hf_model, unwrap), observe(*observers):
        check_conflicts(current_observers())
        stack = flatten(current_observers())
        points = {getattr(o, "point", None) for o in stack}
        with (
            resid_edits(hf_model) if Point.RESID in points else contextlib.nullcontext(),
            mlp_in_edits(hf_model) if Point.MLP_IN in points else contextlib.nullcontext(),
        ):
            yield hf_model
