"""Slow, obviously-correct re-computations of every metric, straight from the definitions.

One prompt at a time, unpadded, through a *separate* plain transformers model loaded with
``attn_implementation="eager"`` and ``output_attentions=True``; metrics computed with Python
loops over positions from the returned ``[head, query, key]`` patterns, in float64.

The generic parts (the eager model, one prompt's patterns, sliding windows, visible keys) live in
:mod:`workbench.testing`, where plugin authors get them too; they are re-exported here under the
names the tests use (``patterns`` is :func:`workbench.testing.eager_patterns`).
"""

from __future__ import annotations

import math

import torch

from workbench.engine.decoding import _cache_kwarg

# re-exported: the tests import these from here
from workbench.testing import attention_windows, check_visibility, eager_model, visible_keys  # noqa: F401
from workbench.testing import eager_patterns as patterns  # noqa: F401


def entropy_reference(
    all_patterns: list[list[torch.Tensor]], windows: list[int | None] | None = None
) -> tuple[dict, dict, int]:
    """entropy[(l,h)], entropy_norm[(l,h)] and n: means over queries q >= 1 of
    H_q = -sum_{k visible} A[q,k] ln A[q,k] (0 ln 0 = 0) and of H_q / ln(number of keys q may
    see), which is q + 1 under a causal mask and min(q + 1, W) on a layer with a sliding window
    of W keys (``windows``, per layer; None = every layer full)."""
    sums, sums_norm, n = {}, {}, 0
    for pats in all_patterns:
        T = pats[0].shape[-1]
        n += T - 1
        for layer, A in enumerate(pats):
            visible = torch.zeros(T, T, dtype=torch.bool)
            for q in range(T):
                visible[q, visible_keys(q, windows[layer] if windows else None)] = True
            terms = torch.where(visible & (A > 0), A * A.clamp_min(1e-300).log(), torch.zeros_like(A))
            H = (-terms.sum(-1)).tolist()  # [head][query]
            n_keys = visible.sum(-1).tolist()
            for q in range(1, T):
                assert n_keys[q] >= 2
                for head in range(A.shape[0]):
                    sums[(layer, head)] = sums.get((layer, head), 0.0) + H[head][q]
                    sums_norm[(layer, head)] = sums_norm.get((layer, head), 0.0) + H[head][q] / math.log(n_keys[q])
    return {k: v / n for k, v in sums.items()}, {k: v / n for k, v in sums_norm.items()}, n


def sink_reference(all_patterns: list[list[torch.Tensor]], epsilon: float = 0.3) -> tuple[dict, dict, int]:
    """sink_mass and sink_rate: alpha_0 = (1/T) sum_q A[q, 0], mean over prompts / share > eps."""
    mass, hits = {}, {}
    for pats in all_patterns:
        T = pats[0].shape[-1]
        for layer, A in enumerate(pats):
            # the paper's formula: (A / arange(T, 0, -1)).sum(dim=-2), first key
            alpha = (A / torch.arange(T, 0, -1, dtype=A.dtype)).sum(dim=-2)[:, 0]
            for head in range(A.shape[0]):
                direct = sum(float(A[head, q, 0]) for q in range(T)) / T
                assert abs(direct - float(alpha[head])) < 1e-9
                mass[(layer, head)] = mass.get((layer, head), 0.0) + direct
                hits[(layer, head)] = hits.get((layer, head), 0) + (direct > epsilon)
    n = len(all_patterns)
    return {k: v / n for k, v in mass.items()}, {k: v / n for k, v in hits.items()}, n


def induction_reference(all_patterns, all_ids, metas) -> dict[str, tuple[dict, int]]:
    """prev_token / duplicate / induction / echo by direct loops over query positions."""
    sums = {m: {} for m in ("prev_token", "duplicate", "induction", "echo")}
    counts = {m: 0 for m in sums}
    for pats, ids, meta in zip(all_patterns, all_ids, metas):
        T, n, off = len(ids), meta.get("period", 0), meta.get("offset", 0)
        for q in range(T):
            targets = {}
            if q >= 1:
                targets["prev_token"] = [q - 1]
            if n and q - off >= n:
                targets["duplicate"] = [q - n]
                targets["induction"] = [q - n + 1]
            earlier = [k for k in range(q) if ids[k] == ids[q]]
            if earlier:
                targets["echo"] = earlier
            for metric, ks in targets.items():
                counts[metric] += 1
                for layer, A in enumerate(pats):
                    mass = A[:, q, ks].sum(-1).tolist()  # [head]
                    for head in range(A.shape[0]):
                        key = (layer, head)
                        sums[metric][key] = sums[metric].get(key, 0.0) + mass[head]
    return {m: ({k: v / counts[m] for k, v in sums[m].items()}, counts[m]) for m in sums}


def streaming_reference(all_patterns, sink: int = 4, recent: int = 64) -> tuple[dict, int]:
    sums, n = {}, 0
    for pats in all_patterns:
        T = pats[0].shape[-1]
        for q in range(sink + recent, T):
            n += 1
            keys = [k for k in range(q + 1) if k < sink or q - k < recent]
            for layer, A in enumerate(pats):
                mass = A[:, q, keys].sum(-1).tolist()  # [head]
                for head in range(A.shape[0]):
                    sums[(layer, head)] = sums.get((layer, head), 0.0) + mass[head]
    return {k: v / n for k, v in sums.items()}, n


def retrieval_reference(model, tokenizer, ids, span, stop_ids, max_new_tokens=50):
    """The paper's loop, one prompt, no padding: prefill all but the last token, then feed tokens
    one at a time with output_attentions and score top-1 keys. Returns (scores[l][h], output ids)."""
    from transformers import DynamicCache

    s, e = span
    n_layers = model.config.num_hidden_layers
    scores = [[0.0] * model.config.num_attention_heads for _ in range(n_layers)]
    prompt = torch.tensor([ids])
    KV = _cache_kwarg(model)  # the KV-cache argument's name in this transformers
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=prompt[:, :-1], **{KV: cache}, use_cache=True, logits_to_keep=1)
        cache, inp, output = out[KV], prompt[:, -1], []
        for _ in range(max_new_tokens):
            out = model(input_ids=inp.view(1, 1), **{KV: cache}, use_cache=True, output_attentions=True)
            cache = out[KV]
            inp = out.logits[0, -1].argmax()
            output.append(int(inp))
            for layer in range(n_layers):
                for head in range(len(scores[layer])):
                    j = int(out.attentions[layer][0, head, -1].argmax())
                    if s <= j < e and j < len(ids) and ids[j] == int(inp):
                        scores[layer][head] += 1 / (e - s)
            if int(inp) in stop_ids:
                break
    return scores, output


def serial_path_patching(source, pairs, senders, receivers=None, last_only=False):
    """Path patching the plain way: a plain HF model (Llama or Gemma families), one sender at a
    time, explicit runs with forward hooks on o_proj (head outputs) and q/k/v_proj (receiver
    inputs). Patching a head's slice of the q/k/v_proj output is patching its query / key /
    value: what follows (Gemma's QK-norm, RoPE) acts on each head separately. ``last_only``
    patches the receivers at the read-out position only. Returns the mean patched logit
    difference per sender and the clean / corrupted means. ``source``: a model folder, or an
    already loaded plain eager model."""
    model = eager_model(source) if isinstance(source, str) else source
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H  # Gemma: head_dim != hidden / heads
    layers = model.model.layers

    head = model.get_output_embeddings()

    def run(ids, answers, z_edit=None, record_z=None, qkv_edit=None, record_qkv=None):
        """The logits of the two answer tokens at the last position (the LM head's rows for
        them, and the model's final soft-cap if it has one: only 2 of the vocabulary's rows)."""
        hooks = _serial_hooks(layers, z_edit, record_z, qkv_edit, record_qkv)
        try:
            with torch.no_grad():
                hidden = model.base_model(torch.tensor([ids])).last_hidden_state[0, -1]
                rows = list(answers)
                logits = torch.nn.functional.linear(
                    hidden, head.weight[rows], None if head.bias is None else head.bias[rows]
                )
                cap = getattr(cfg, "final_logit_softcapping", None)
                if cap:
                    logits = cap * torch.tanh(logits / cap)
        finally:
            for h in hooks:
                h.remove()
        return logits

    results = {s: [] for s in senders}
    ld_c, ld_x = [], []
    for p in pairs:
        zc, zx = {}, {}
        ans = (p.correct, p.incorrect)
        lc = run(p.clean, ans, record_z=zc)
        lx = run(p.corrupted, ans, record_z=zx)
        ld_c.append(float(lc[0] - lc[1]))
        ld_x.append(float(lx[0] - lx[1]))
        for s in senders:
            freeze = _freeze_all_but(s, zc, zx, d)
            if not receivers:
                lp = run(p.clean, ans, z_edit=freeze)
            else:
                rec = {}
                run(p.clean, ans, z_edit=freeze, record_qkv=rec)
                lp = run(p.clean, ans, qkv_edit=_receiver_patch(receivers, rec, H // Hkv, d, last_only))
            results[s].append(float(lp[0] - lp[1]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {s: mean(v) for s, v in results.items()}, mean(ld_c), mean(ld_x)


def _serial_hooks(layers, z_edit, record_z, qkv_edit, record_qkv) -> list:
    """Per layer, an o_proj pre-hook (z) and q/k/v_proj hooks that record and / or edit; the handles."""
    hooks = []
    for layer, block in enumerate(layers):
        attn = block.self_attn
        hooks.append(attn.o_proj.register_forward_pre_hook(_z_hook(layer, z_edit, record_z)))
        for which in ("q", "k", "v"):
            proj = getattr(attn, f"{which}_proj")
            hooks.append(proj.register_forward_hook(_qkv_hook(layer, which, qkv_edit, record_qkv)))
    return hooks


def _z_hook(layer, z_edit, record_z):
    """o_proj pre-hook of one layer: record the heads' z (the o_proj input), then apply ``z_edit``."""

    def pre(m, args):
        z = args[0]
        if record_z is not None:
            record_z[layer] = z.detach().clone()
        if z_edit is not None:
            z = z_edit(layer, z)
        return (z,)

    return pre


def _qkv_hook(layer, which, qkv_edit, record_qkv):
    """q/k/v_proj forward hook of one layer: record the projection's output, then apply ``qkv_edit``."""

    def post(m, a, out):
        if record_qkv is not None:
            record_qkv[(layer, which)] = out.detach().clone()
        if qkv_edit is not None:
            return qkv_edit(layer, which, out)
        return out

    return post


def _freeze_all_but(s, zc, zx, d):
    """z edit of the path-patching run: every head at its clean z except sender ``s``, at its corrupted z."""

    def freeze(layer, z):
        z = zc[layer].clone()
        if layer == s[0]:
            z[..., s[1] * d : (s[1] + 1) * d] = zx[layer][..., s[1] * d : (s[1] + 1) * d]
        return z

    return freeze


def _receiver_patch(receivers, rec, group, d, last_only):
    """q/k/v edit of the second run: each receiver's slice (its KV head for k / v) from the recorded ``rec``."""

    def patch(layer, which, out):
        for rl, rh, rw in receivers:
            if rl == layer and rw == which:
                idx = rh if which == "q" else rh // group
                out = out.clone()
                at = slice(-1, None) if last_only else slice(None)  # the read-out position, or all
                out[:, at, idx * d : (idx + 1) * d] = rec[(layer, which)][:, at, idx * d : (idx + 1) * d]
        return out

    return patch


# -- head-output divergence (VHD / context) ----------------------------------------------------
def _o_proj_modules(hf):
    """Each decoder layer's output projection in a plain HF model (Llama / Gemma families)."""
    layers = hf.get_decoder().layers
    return [layer.self_attn.o_proj for layer in layers]


def reference_head_z(hf, inputs: dict, positions: list[int]):
    """z of every head at ``positions`` of a single unpadded input, from the o_proj input of a
    plain HF forward: ``[len(positions), layer, head, d_head]``."""
    import torch

    cfg = hf.config.get_text_config()
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    got = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, i=i: got.__setitem__(i, args[0][0, positions].detach()))
        for i, m in enumerate(_o_proj_modules(hf))
    ]
    try:
        with torch.no_grad():
            out = hf(**inputs)
    finally:
        for h in handles:
            h.remove()
    z = torch.stack([got[i] for i in range(len(got))], dim=1)  # [pos, layer, head*d]
    return z.view(len(positions), len(got), n_heads, d_head).double(), out


def reference_vhd(hf, processor, text: str, image, counter_image=None, max_new_tokens: int = 1):
    """VHD the slow way: greedy generation with the image (batch 1, plain HF), then two plain
    forwards over prompt + y_<T, with and without the image; L2 per head per step."""
    import torch

    placeholder = processor.image_token
    cond = processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        seq = hf.generate(**cond, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
    gen = seq[0, cond["input_ids"].shape[1] :].tolist()
    eos = hf.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    cut = next((n + 1 for n, t in enumerate(gen) if t in eos), len(gen))
    gen = gen[:cut]
    if counter_image is not None:
        base = processor(text=[text], images=[[counter_image]], return_tensors="pt")
    else:
        base = processor(text=[text.replace(placeholder, "")], return_tensors="pt")
    zs = []
    for enc in (cond, base):
        ids = torch.cat([enc["input_ids"], torch.tensor([gen[:-1]], dtype=torch.long)], dim=1)
        inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "token_type_ids" in inputs:
            inputs["token_type_ids"] = torch.cat(
                [inputs["token_type_ids"], torch.zeros(1, len(gen) - 1, dtype=torch.long)], 1
            )
        n = enc["input_ids"].shape[1]
        z, _ = reference_head_z(hf, {"input_ids": ids, **inputs}, list(range(n - 1, n - 1 + len(gen))))
        zs.append(z)
    return gen, (zs[0] - zs[1]).norm(dim=-1)


def reference_condition_attention(hf, inputs: dict, position: int, condition_ids: set[int]):
    """Attention mass on the condition's tokens at ``position``, from eager output_attentions."""
    import torch

    with torch.no_grad():
        out = hf(**inputs, output_attentions=True)
    keys = torch.tensor([t in condition_ids for t in inputs["input_ids"][0].tolist()], dtype=torch.double)
    return torch.stack([a[0, :, position].double() @ keys for a in out.attentions])  # [layer, head]


# -- circuits: head ablation and edge circuits, one prompt at a time ----------------------------
def reference_outputs(model, ids: list[int]) -> dict:
    """One unpadded prompt through a plain HF Llama: every head's z (the o_proj input, per layer
    ``[T, H*d]``), every node's output by name (``input``, ``a{l}.{h}`` = W_O^h z_h, ``m{l}``)
    and the final logits at the last position."""
    cfg = model.config
    H = cfg.num_attention_heads
    d = cfg.hidden_size // H
    z, mlp, emb = {}, {}, {}
    hooks = [
        model.model.embed_tokens.register_forward_hook(lambda m, a, out: emb.__setitem__(0, out[0].detach().clone()))
    ]
    for layer, block in enumerate(model.model.layers):
        hooks.append(
            block.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, layer=layer: z.__setitem__(layer, a[0][0].detach().clone())
            )
        )
        hooks.append(
            block.mlp.register_forward_hook(
                lambda m, a, out, layer=layer: mlp.__setitem__(layer, out[0].detach().clone())
            )
        )
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    outs = {"input": emb[0]}
    for layer, block in enumerate(model.model.layers):
        W = block.self_attn.o_proj.weight
        for h in range(H):
            outs[f"a{layer}.{h}"] = z[layer][:, h * d : (h + 1) * d] @ W[:, h * d : (h + 1) * d].T
        outs[f"m{layer}"] = mlp[layer]
    return {"z": z, "outputs": outs, "logits": logits}


def reference_head_ablation_ld(model, pair, ablate: set, z_replacement: dict) -> float:
    """LD of one clean prompt with the heads in ``ablate`` given ``z_replacement[l]`` (``[T, H*d]``)
    at every position, through o_proj pre-hooks of a plain HF model."""
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads

    def pre(m, args, layer):
        z = args[0].clone()
        for al, ah in ablate:
            if al == layer:
                z[0, :, ah * d : (ah + 1) * d] = z_replacement[layer][:, ah * d : (ah + 1) * d]
        return (z,)

    hooks = [
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, a, layer=layer: pre(m, a, layer))
        for layer, block in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = model(torch.tensor([pair.clean])).logits[0, -1]
    finally:
        for h in hooks:
            h.remove()
    return float(logits[pair.correct] - logits[pair.incorrect])


def reference_edge_circuit_ld(model, pair, keep: set, ablated: dict) -> float:
    """LD of one clean prompt through an edge circuit, computed head by head with plain HF
    modules: each reader (``a{l}.{h}.q``, ``a{l}.{g}.k`` / ``.v`` per KV head, ``m{l}``,
    ``logits``) sums, over every earlier writer (``input``, ``a{l}.{h}``, ``m{l}``), the writer's
    actual output if ``(reader, writer)`` is in ``keep``, else its ``ablated`` output."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // H
    T = len(pair.clean)
    ids = torch.tensor([pair.clean])
    with torch.no_grad():
        out = {"input": model.model.embed_tokens(ids)[0]}
        cos, sin = model.model.rotary_emb(out["input"][None], torch.arange(T)[None])
        writers = ["input"]

        def read(reader: str) -> torch.Tensor:
            return sum(out[w] if (reader, w) in keep else ablated[w] for w in writers)

        for layer, block in enumerate(model.model.layers):
            attn = block.self_attn
            ln = block.input_layernorm
            ks, vs = [], []
            for g in range(Hkv):
                xk = ln(read(f"a{layer}.{g}.k"))
                xv = ln(read(f"a{layer}.{g}.v"))
                ks.append(attn.k_proj(xk)[:, g * d : (g + 1) * d])
                vs.append(attn.v_proj(xv)[:, g * d : (g + 1) * d])
            new = {}
            for h in range(H):
                g = h // (H // Hkv)
                q = attn.q_proj(ln(read(f"a{layer}.{h}.q")))[:, h * d : (h + 1) * d]
                q_rot, k_rot = apply_rotary_pos_emb(q[None, None], ks[g][None, None], cos, sin)
                scores = (q_rot[0, 0] @ k_rot[0, 0].T) * attn.scaling
                scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
                zh = torch.softmax(scores, dim=-1) @ vs[g]
                new[f"a{layer}.{h}"] = zh @ attn.o_proj.weight[:, h * d : (h + 1) * d].T
            out.update(new)
            writers += [f"a{layer}.{h}" for h in range(H)]
            out[f"m{layer}"] = block.mlp(block.post_attention_layernorm(read(f"m{layer}")))
            writers.append(f"m{layer}")
        logits = model.lm_head(model.model.norm(read("logits")))[-1]
    return float(logits[pair.correct] - logits[pair.incorrect])
