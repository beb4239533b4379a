"""Retrieval-score throughput: our batched decoding vs a batch-size-1 loop written the way the
paper's code does it (nightdessert/Retrieval_Head: eager attention, ``output_attentions=True``
at every decoding step, one prompt at a time), on the same niah prompts, in the same process.

    python benchmarks/bench_retrieval.py [--n-prompts 8] [--context-len 1000] [--batch-size 8] [--shared-haystack]

Prints prompts per second for both and their ratio, and checks the per-head scores agree; then
the same with the prefill as one padded batch (the GPU default) against the CPU default (prompt
by prompt, shared prefixes reused).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def paper_loop(model, tokenizer, prompts, stops, max_new_tokens):
    """One prompt at a time, attentions of every layer returned at every step (their method)."""
    from transformers import DynamicCache

    from workbench.engine.decoding import _cache_kwarg

    KV = _cache_kwarg(model)
    out_scores = []
    for p in prompts:
        ids = torch.tensor([p.ids])
        s, e = p.meta["answer_span"]
        L, H = model.config.num_hidden_layers, model.config.num_attention_heads
        score = torch.zeros(L, H, dtype=torch.float64)
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], **{KV: DynamicCache()}, use_cache=True)
            cache, inp = out[KV], ids[0, -1]
            for _ in range(max_new_tokens):
                out = model(input_ids=inp.view(1, 1), **{KV: cache}, use_cache=True, output_attentions=True)
                cache = out[KV]
                inp = out.logits[0, -1].argmax()
                for layer in range(L):
                    top = out.attentions[layer][0, :, -1].topk(1).indices[:, 0]
                    for h in range(H):
                        j = int(top[h])
                        if s <= j < e and p.ids[j] == int(inp):
                            score[layer, h] += 1 / (e - s)
                if int(inp) in stops:
                    break
        out_scores.append(score)
    return out_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument(
        "--shared-haystack",
        action="store_true",
        help="the paper's grid: one haystack, needles at n evenly spaced depths (prefixes shared)",
    )
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from probes.retrieval import generate_and_score, newline_token_ids
    from workbench.datasets import make_dataset
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.models.loading import load_model
    from workbench.protocol.run_context import RunContext

    torch.set_grad_enabled(False)
    wb = load_model("smollm2-135m", device="cpu")
    prompts = tokenize_prompts(
        make_dataset(
            "niah",
            n_prompts=args.n_prompts,
            seed=5,
            tokenizer=wb.tokenizer,
            context_len=args.context_len,
            **(
                {"shared_haystack": True, "depths": [i / max(1, args.n_prompts - 1) for i in range(args.n_prompts)]}
                if args.shared_haystack
                else {}
            ),
        ),
        wb.tokenizer,
        wb.n_ctx,
        wb.vocab_size,
    )
    eager = AutoModelForCausalLM.from_pretrained(wb.source, attn_implementation="eager").eval()
    stops = newline_token_ids(wb.tokenizer) | {wb.tokenizer.eos_token_id}
    paper_loop(eager, wb.tokenizer, prompts[:1], stops, 2)  # warm-up
    generate_and_score(wb, prompts[:1], max_new_tokens=2)
    t0 = time.perf_counter()
    ref = paper_loop(eager, wb.tokenizer, prompts, stops, args.max_new_tokens)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = generate_and_score(
        wb,
        prompts,
        max_new_tokens=args.max_new_tokens,
        require_correct=False,
        ctx=RunContext(batch_size=args.batch_size),
    )
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    padded = generate_and_score(
        wb,
        prompts,
        max_new_tokens=args.max_new_tokens,
        ctx=RunContext(batch_size=args.batch_size),
        require_correct=False,
        prefill="batched",
    )
    t_padded = time.perf_counter() - t0
    diff = max(float((r.scores - s).abs().max()) for r, s in zip(ours, ref))
    n = len(prompts)
    kind = "one shared haystack, evenly spaced depths" if args.shared_haystack else "a haystack per prompt"
    print(
        f"{n} niah prompts x {args.context_len} tokens ({kind}), "
        f"up to {args.max_new_tokens} new tokens, SmolLM2-135M, CPU"
    )
    print(f"paper-style loop (batch 1, eager, output_attentions): {n / t_ref:.3f} prompts/s ({t_ref:.1f} s)")
    print(f"workbench (batch {args.batch_size}, SDPA + last-row scores): {n / t_ours:.3f} prompts/s ({t_ours:.1f} s)")
    print(f"speed-up: {t_ref / t_ours:.2f}x; max abs score difference {diff:.2e}")
    diff_p = max(float((a.scores - b.scores).abs().max()) for a, b in zip(padded, ours))
    print(
        f"same, prefill as one padded batch (the GPU default): {n / t_padded:.3f} prompts/s ({t_padded:.1f} s), "
        f"{t_padded / t_ours:.2f}x the time of the CPU default; max abs score difference {diff_p:.2e}"
    )


if __name__ == "__main__":
    main()
