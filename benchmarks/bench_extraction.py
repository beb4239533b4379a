"""Time and peak memory of per-head entropy + sink metrics, against baselines measured in the same run.

For SmolLM2-135M (float32, CPU unless CUDA is visible) at batch x tokens 4 x 512 and 1 x 4096:

  (a) hf_sdpa   bare transformers forward (AutoModelForCausalLM, attn_implementation="sdpa")
  (b) tl_cache  TransformerLens TransformerBridge.run_with_cache(names_filter=hook_pattern),
                then entropy / sink computed from the cached patterns
  (c) workbench our `entropy,sink` probes (run_probes), metrics reduced inside the forward

Each (method, shape) runs in its own process so peak RSS is that method's own; the time is the
median of the repeats after one warm-up, model loading excluded. Ratios are against (a) of
the same shape, measured in this same run.

    python benchmarks/bench_extraction.py            # all shapes and methods
    python benchmarks/bench_extraction.py --quick    # 4 x 512 only
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHAPES = [(4, 512), (1, 4096)]
METHODS = ["hf_sdpa", "tl_cache", "workbench"]


def real_text_ids(tokenizer, batch: int, tokens: int) -> list[list[int]]:
    """``batch`` rows of exactly ``tokens`` ids of real prose (different documents per row)."""
    from workbench.datasets.prose import load_documents

    docs = load_documents()
    rows, i = [], 0
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tokenizer(docs[(i * 37) % len(docs)]["text"] + "\n")["input_ids"]
            i += 1
        rows.append(ids[:tokens])
    return rows


def child(method: str, batch: int, tokens: int, repeats: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.device import resolve_device
    from workbench.embedded import ensure_embedded
    from workbench.models import load_model

    folder, device = str(ensure_embedded(quiet=True)), resolve_device("auto")
    rows = real_text_ids(AutoTokenizer.from_pretrained(folder), batch, tokens)
    ids = torch.tensor(rows, device=device)
    if method == "hf_sdpa":  # only the plain HF model in this process, so its peak is its own
        hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
        run = lambda: hf(ids, use_cache=False)  # noqa: E731
    else:
        wb = load_model("smollm2-135m", device=device)
    if method == "tl_cache":
        bridge = wb.bridge

        def run():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
            ent, sink = [], []
            for layer in range(wb.n_layers):
                a = cache[f"blocks.{layer}.attn.hook_pattern"].float()  # [batch, head, q, k]
                h = torch.special.entr(a).sum(-1)[..., 1:]  # q >= 1
                ent.append(h.mean((0, 2)))
                sink.append((a[..., 0].sum(-1) / a.shape[-1]).mean(0))
            return torch.stack(ent), torch.stack(sink)
    elif method == "workbench":
        from probes import get_probe
        from workbench.runner import run_probes
        from workbench.prompts import TokenizedPrompt

        prompts = [TokenizedPrompt(str(i), r) for i, r in enumerate(rows)]
        run = lambda: run_probes(wb, prompts, [get_probe("entropy"), get_probe("sink")], batch_size=batch, progress=False)  # noqa: E731
    elif method != "hf_sdpa":
        raise SystemExit(f"unknown method {method}")
    from timing import median_time_and_peak

    seconds, peak_gb = median_time_and_peak(run, repeats, warmup=True)
    return {"method": method, "batch": batch, "tokens": tokens, "seconds": seconds, "peak_gb": peak_gb, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only 4 x 512")
    ap.add_argument("--shape", help="only this BATCHxTOKENS, e.g. 1x4096")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of all methods (the machine drifts)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.tokens, args.repeats)))
        return
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shape:
        b, t = args.shape.lower().split("x")
        shapes = [(int(b), int(t))]
    methods = args.methods.split(",")
    if methods[0] != "hf_sdpa":
        methods = ["hf_sdpa"] + [m for m in methods if m != "hf_sdpa"]
    print(f"rounds: {args.rounds} (methods alternate within a round; ratios are per round, then the median)")
    print(f"{'batch x tokens':>15} {'method':>10} {'time s':>8} {'peak GB':>8} {'time/(a)':>9} {'mem/(a)':>8}")
    for batch, tokens in shapes:
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                repeats = args.repeats if tokens <= 1024 else 1
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", method, "--batch", str(batch), "--tokens", str(tokens), "--repeats", str(repeats)],
                    capture_output=True, text=True,
                )
                if proc.returncode != 0:
                    why = "killed (out of memory?)" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"{batch:>6} x {tokens:<6} {method:>10} failed: {why}", flush=True)
                    continue
                runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        base = runs["hf_sdpa"]
        for method in methods:
            rs = runs[method]
            if not rs or not base:
                continue
            t = statistics.median(r["seconds"] for r in rs)
            mem = max(r["peak_gb"] for r in rs)
            tr = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(rs, base))
            mr = mem / max(b["peak_gb"] for b in base)
            print(f"{batch:>6} x {tokens:<6} {method:>10} {t:8.2f} {mem:8.2f} {tr:8.2f}x {mr:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
