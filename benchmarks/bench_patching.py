"""Path patching of every SmolLM2-135M head to the logits, against the loop people write; and
edge attribution (EAP, EAP-IG) against exact edge patching. Same process, same prompts,
ratios per round.

Baseline (ARENA's path-patching loop, on plain transformers): one forward per sender with all
prompts in one batch, ``attn_implementation="sdpa"``, ``o_proj`` forward pre-hooks that set
every head's z to its clean value and the sender's to its corrupted value, MLPs recomputed,
logits of the last position only (prompts left-padded so it is the same index; explicit
position ids). Ours: ``path_patching(engine="graph")`` (read-out position only, no attention
between sender and logits); and, for reference, the same function through the attention hook
(``engine="hooks"``: stacked variants, shared clean prefix, full forwards).

    python benchmarks/bench_patching.py [--n-prompts 8] [--senders all|N] [--rounds 2] [--edges 100] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def arena_path_patching(hf, pairs, senders, pad_id: int) -> dict:
    """The baseline loop: returns the mean patched LD per sender."""
    import torch

    cfg = hf.config
    H = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    T = max(len(p.clean) for p in pairs)

    def batch(key):
        ids = torch.full((len(pairs), T), pad_id)
        mask = torch.zeros(len(pairs), T, dtype=torch.long)
        for i, p in enumerate(pairs):
            row = getattr(p, key)
            ids[i, T - len(row) :] = torch.tensor(row)
            mask[i, T - len(row) :] = 1
        return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)

    clean, corrupted = batch("clean"), batch("corrupted")
    correct = torch.tensor([p.correct for p in pairs])
    incorrect = torch.tensor([p.incorrect for p in pairs])
    layers = hf.model.layers

    def run(inputs, pre=None):
        ids, mask, pos = inputs
        hooks = (
            [
                block.self_attn.o_proj.register_forward_pre_hook(lambda m, a, layer=layer: pre(layer, a[0]))
                for layer, block in enumerate(layers)
            ]
            if pre
            else []
        )
        try:
            with torch.no_grad():
                logits = hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        return logits.gather(1, correct[:, None])[:, 0] - logits.gather(1, incorrect[:, None])[:, 0]

    z_clean, z_corr = {}, {}
    run(clean, lambda layer, z: z_clean.__setitem__(layer, z.clone()))
    run(corrupted, lambda layer, z: z_corr.__setitem__(layer, z.clone()))
    out = {}
    for sl, sh in senders:

        def freeze(layer, z, sl=sl, sh=sh):
            new = z_clean[layer].clone()
            if layer == sl:
                new[..., sh * d : (sh + 1) * d] = z_corr[layer][..., sh * d : (sh + 1) * d]
            return (new,)

        out[(sl, sh)] = float(run(clean, freeze).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--senders", default="all", help="all, or N heads spread over the layers (quicker)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (each times every method once)")
    ap.add_argument(
        "--edges", type=int, default=100, help="edges for the exact-edge-patching timing (0 = skip the edge part)"
    )
    ap.add_argument("--no-hooks", action="store_true", help="skip the attention-hook engine")
    ap.add_argument("--threads", type=int, help="torch threads for every method (default: torch's)")
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from circuits.ablation import make_ablation
    from circuits.baseline import baseline
    from circuits.edges import edge_attribution, exact_edge_effects
    from circuits.graph import graph_for
    from circuits.patching import path_patching
    from circuits.tasks import make_task
    from workbench.inputs.prompts import pad_token_id
    from workbench.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(model.source, attn_implementation="sdpa", dtype=torch.float32).eval()
    pairs = make_task("ioi", model.tokenizer, n=args.n_prompts, seed=0)
    senders = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    if args.senders != "all":
        step = max(1, len(senders) // int(args.senders))
        senders = senders[::step][: int(args.senders)]
    print(
        f"{len(senders)} senders -> logits, {len(pairs)} IOI pairs, SmolLM2-135M, CPU float32, "
        f"{torch.get_num_threads()} threads"
    )
    pad = pad_token_id(model.tokenizer)
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        arena = arena_path_patching(hf, pairs, senders, pad)
        t_arena = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = path_patching(model, pairs, senders=senders, engine="graph")  # includes its own clean / corrupted runs
        t_ours = time.perf_counter() - t0
        diff = max(abs(r.ld - arena[(r.layer, r.head)]) for r in ours.itertuples())
        line = (
            f"round {rnd}: ARENA loop (sdpa, o_proj hooks, batch of all prompts) {t_arena:.1f} s; "
            f"ours (read-out positions) {t_ours:.2f} s: {t_arena / t_ours:.1f}x"
        )
        if not args.no_hooks:
            t0 = time.perf_counter()
            hooked = path_patching(model, pairs, senders=senders, engine="hooks")
            t_hooks = time.perf_counter() - t0
            diff = max(diff, float((hooked.ld - ours.ld).abs().max()))
            line += f"; attention-hook engine {t_hooks:.1f} s ({t_arena / t_hooks:.1f}x)"
        print(line + f"; max |LD difference| {diff:.1e}")

    if args.edges:
        from scipy.stats import spearmanr

        g = graph_for(model)
        base = baseline(model, pairs)
        abl = make_ablation(model, base, "mean", make_task("ioi", model.tokenizer, n=64, seed=1), graph=g)
        for rnd in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            eap = edge_attribution(g, base, abl, "eap")
            t_eap = time.perf_counter() - t0
            t0 = time.perf_counter()
            ig = edge_attribution(g, base, abl, "eap-ig", steps=5)
            t_ig = time.perf_counter() - t0
            ranked = ig.ranked()
            sample = (
                ranked[: args.edges // 2]
                + ranked[args.edges // 2 :: max(1, len(ranked) // max(1, args.edges - args.edges // 2))][
                    : args.edges - args.edges // 2
                ]
            )
            t0 = time.perf_counter()
            exact = exact_edge_effects(g, base, abl, sample).double().mean(1) - base.ld_clean.double().mean()
            t_exact = time.perf_counter() - t0
            per_edge = t_exact / len(sample)
            all_exact = per_edge * g.n_edges
            rho = {
                k: spearmanr([float(s.scores[v, u]) for v, u in sample], exact.numpy()).statistic
                for k, s in (("EAP", eap), ("EAP-IG", ig))
            }
            print(
                f"edges round {rnd}: {g.n_edges} edges; EAP {t_eap:.1f} s, EAP-IG (5 steps) {t_ig:.1f} s for all; "
                f"exact edge patching {per_edge * 1000:.0f} ms per edge ({len(sample)} timed) "
                f"= {all_exact / 3600:.1f} h for all: EAP {all_exact / t_eap:.0f}x, "
                f"EAP-IG {all_exact / t_ig:.0f}x faster; "
                f"Spearman vs exact: EAP {rho['EAP']:.3f}, EAP-IG {rho['EAP-IG']:.3f}"
            )


if __name__ == "__main__":
    main()
