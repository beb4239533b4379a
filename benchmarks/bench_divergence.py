"""Head-output divergence throughput (the engine behind ``vhd`` and ``context``) against two
baselines measured in the same run, on the same items:

1. the straightforward loop (He et al.'s recipe, one item at a time): greedy generation with the
   condition, then one forward per condition over prompt + answer with hooks on every layer's
   ``o_proj`` input (plain HF model), distances per head;
2. TransformerLens: the same loop with ``bridge.run_with_cache(names_filter=hook_z)``.

Ours: one batched greedy decode, then one batched teacher-forced forward per condition, head
outputs captured in the attention hook at the answer positions only.

    python benchmarks/bench_divergence.py [--model smollm2-135m] [--n-items 41] [--max-new-tokens 8]

Text model + ``counterfact`` items (no pretrained VLM is downloadable here; the engine is the
same for images). Prints items per second, the ratios, and the max difference in divergence.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _z_hooks(hf, store):
    layers = hf.get_decoder().layers
    return [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(i, a[0][0].detach()))
        for i, layer in enumerate(layers)
    ]


def _greedy(hf, ids, max_new_tokens, pad, eos):
    """Batch-1 greedy answer with the condition, up to and including EOS."""
    ids = torch.tensor([ids])
    seq = hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    gen = seq[0, ids.shape[1] :].tolist()
    return gen[: next((n + 1 for n, t in enumerate(gen) if t == eos), len(gen))]


def plain_loop(hf, pairs, max_new_tokens, pad, eos):
    out = []
    cfg = hf.config.get_text_config()
    n_heads = cfg.num_attention_heads
    for p in pairs:
        gen = _greedy(hf, p.cond.input_ids, max_new_tokens, pad, eos)
        zs = []
        for row in (p.cond.input_ids, p.base.input_ids):
            store = {}
            hooks = _z_hooks(hf, store)
            try:
                hf(input_ids=torch.tensor([row + gen[:-1]]))
            finally:
                for h in hooks:
                    h.remove()
            pos = list(range(len(row) - 1, len(row) - 1 + len(gen)))
            z = torch.stack([store[i][pos] for i in range(len(store))], 1)
            zs.append(z.view(len(pos), len(store), n_heads, -1).double())
        out.append((zs[0] - zs[1]).norm(dim=-1))
    return out


def tl_loop(model, pairs, max_new_tokens, pad, eos):
    bridge, hf = model.bridge, model.hf_model
    out = []
    for p in pairs:
        gen = _greedy(hf, p.cond.input_ids, max_new_tokens, pad, eos)
        zs = []
        for row in (p.cond.input_ids, p.base.input_ids):
            _, cache = bridge.run_with_cache(
                torch.tensor([row + gen[:-1]]), names_filter=lambda n: n.endswith("attn.hook_z")
            )
            pos = list(range(len(row) - 1, len(row) - 1 + len(gen)))
            z = torch.stack([cache[f"blocks.{i}.attn.hook_z"][0, pos] for i in range(model.n_layers)], 1)
            zs.append(z.double())
        out.append((zs[0] - zs[1]).norm(dim=-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-items", type=int, default=41)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from workbench.datasets import make_dataset
    from workbench.engine.divergence import divergence
    from workbench.inputs.conditions import passage_pair
    from workbench.models.loading import load_model
    from workbench.protocol.run_context import RunContext

    torch.set_grad_enabled(False)
    model = load_model(args.model, device="cpu")
    items = make_dataset("counterfact", n_prompts=args.n_items, seed=0)
    pairs = [passage_pair(model, it) for it in items]
    hf = AutoModelForCausalLM.from_pretrained(model.source, attn_implementation="eager").eval()
    tok = model.tokenizer
    pad, eos = (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id), tok.eos_token_id
    # warm-up
    plain_loop(hf, pairs[:1], 2, pad, eos)
    divergence(model, pairs[:2], steps="all", max_new_tokens=2)
    times = {}
    t0 = time.perf_counter()
    ref = plain_loop(hf, pairs, args.max_new_tokens, pad, eos)
    times["plain"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tl = tl_loop(model, pairs, args.max_new_tokens, pad, eos)
    times["tl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = divergence(
        model, pairs, steps="all", max_new_tokens=args.max_new_tokens, ctx=RunContext(batch_size=args.batch_size)
    )
    times["ours"] = time.perf_counter() - t0
    same = [o for o, r in zip(ours, ref) if o.divergence.shape == r.shape]
    diff = max(float((o.divergence - r).abs().max()) for o, r in zip(ours, ref) if o.divergence.shape == r.shape)
    diff_tl = max(float((o - r).abs().max()) for o, r in zip(tl, ref) if o.shape == r.shape)
    n = len(pairs)
    print(f"{n} counterfact items, up to {args.max_new_tokens} answer tokens, {args.model}, CPU")
    print(f"plain HF loop (batch 1, o_proj hooks):        {n / times['plain']:.2f} items/s ({times['plain']:.1f} s)")
    print(f"TransformerLens run_with_cache loop (batch 1): {n / times['tl']:.2f} items/s ({times['tl']:.1f} s)")
    print(
        f"workbench (batch {args.batch_size}, two teacher-forced forwards): "
        f"{n / times['ours']:.2f} items/s ({times['ours']:.1f} s)"
    )
    print(
        f"speed-up: {times['plain'] / times['ours']:.2f}x vs plain loop, {times['tl'] / times['ours']:.2f}x vs TL; "
        f"{len(same)}/{n} items decoded identically; max |divergence diff| {diff:.2e} (TL vs plain {diff_tl:.2e})"
    )


if __name__ == "__main__":
    main()
