"""Time and peak memory of per-head entropy + sink metrics, against baselines measured in the same run.

For SmolLM2-135M (float32, CPU unless CUDA is visible) at batch x tokens 4 x 512 and 1 x 4096:

  (a) hf_sdpa   bare transformers forward (AutoModelForCausalLM, attn_implementation="sdpa"),
                logits of the last position only (``logits_to_keep=1``: what a practitioner who
                wants attention, not logits, would run; the full [batch, T, vocab] logits would
                add a fifth of the forward to the baseline and flatter every ratio)
  (b) tl_cache  TransformerLens TransformerBridge.run_with_cache(names_filter=hook_pattern),
                then entropy / sink computed from the cached patterns
  (c) workbench our `entropy,sink` probes (run_probes), metrics reduced inside the forward

Each (method, shape) runs in its own process so peak RSS is that method's own (``--rounds``).
Time ratios come from one more process per shape that alternates the methods (``--cycles``;
TransformerLens left out at 1 x 4096, where its cache alone is ~20 GB), each against (a) of the
same cycle: on a shared machine two processes minutes apart differ by 20-50%. Model loading is
excluded everywhere; every method is warmed up once.

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
    from workbench.inputs.corpus import load_documents

    docs = load_documents()
    rows, i = [], 0
    for _ in range(batch):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tokenizer(docs[(i * 37) % len(docs)]["text"] + "\n")["input_ids"]
            i += 1
        rows.append(ids[:tokens])
    return rows


def _runner(method: str, batch: int, tokens: int, loaded: dict):
    """A function running ``method`` once on ``batch`` rows of ``tokens`` prose ids (models
    loaded once into ``loaded``, shared by the methods of one process)."""
    import torch

    torch.set_grad_enabled(False)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models.device import resolve_device
    from workbench.models.embedded import ensure_embedded
    from workbench.models.loading import load_model

    folder, device = str(ensure_embedded(quiet=True)), resolve_device("auto")
    if "rows" not in loaded:
        loaded["rows"] = real_text_ids(AutoTokenizer.from_pretrained(folder), batch, tokens)
    rows = loaded["rows"]
    ids = torch.tensor(rows, device=device)
    if method == "hf_sdpa":  # the plain HF model, never the one the bridge wraps
        if "hf" not in loaded:
            loaded["hf"] = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
        hf = loaded["hf"]
        return lambda: hf(ids, use_cache=False, logits_to_keep=1)
    if method not in ("tl_cache", "workbench"):
        raise SystemExit(f"unknown method {method}")
    if "wb" not in loaded:
        loaded["wb"] = load_model("smollm2-135m", device=device)
    wb = loaded["wb"]
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

        return run
    from probes import get_probe
    from workbench.inputs.prompts import TokenizedPrompt
    from workbench.runner import run_probes

    prompts = [TokenizedPrompt(str(i), r) for i, r in enumerate(rows)]
    return lambda: run_probes(wb, prompts, [get_probe("entropy"), get_probe("sink")], batch_size=batch, progress=False)


def child(method: str, batch: int, tokens: int, repeats: int) -> dict:
    """One method alone in this process: its median time and its own peak RSS."""
    from timing import median_time_and_peak

    seconds, peak_gb = median_time_and_peak(_runner(method, batch, tokens, {}), repeats, warmup=True)
    return {
        "method": method,
        "batch": batch,
        "tokens": tokens,
        "seconds": seconds,
        "peak_gb": peak_gb,
        "repeats": repeats,
    }


def child_interleaved(methods: list[str], batch: int, tokens: int, cycles: int) -> dict:
    """Times of the methods in one process, alternating (:func:`timing.alternating_times`): the
    ratio to ``hf_sdpa`` of the same cycle cancels the shared machine's drift, where separate
    processes minutes apart differ by 20-50% here, as much as what is measured."""
    from timing import alternating_times

    loaded: dict = {}
    runs = {m: _runner(m, batch, tokens, loaded) for m in methods}
    return {"batch": batch, "tokens": tokens, "cycles": cycles, "times": alternating_times(runs, cycles)}


def _process_rounds(args: argparse.Namespace, methods: list[str], batch: int, tokens: int) -> dict[str, list[dict]]:
    """``--rounds`` rounds of one child process per method at one shape: each method's own times
    and peak memory (a failed process is reported and left out)."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.rounds):
        for method in methods:
            repeats = args.repeats if tokens <= 1024 else 1
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    "--batch",
                    str(batch),
                    "--tokens",
                    str(tokens),
                    "--repeats",
                    str(repeats),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                why = (
                    "killed (out of memory?)"
                    if proc.returncode < 0
                    else (proc.stderr.strip().splitlines() or ["?"])[-1]
                )
                print(f"{batch:>6} x {tokens:<6} {method:>10} failed: {why}", flush=True)
                continue
            runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


def _same_process_ratios(args: argparse.Namespace, methods: list[str], batch: int, tokens: int) -> dict[str, str]:
    """Each method's time against hf_sdpa of the same cycle, from one child process alternating
    the methods (``--cycles``), as "median (min-max)"; empty when skipped or failed."""
    same: dict[str, str] = {}
    if args.cycles > 0:
        # TransformerLens' cache at 4096 tokens (~20 GB) next to two more models: not in one process
        inter = [m for m in methods if m != "tl_cache" or batch * tokens <= 2048]
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                ",".join(inter),
                "--interleaved",
                "--batch",
                str(batch),
                "--tokens",
                str(tokens),
                "--cycles",
                str(args.cycles),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            t = json.loads(proc.stdout.strip().splitlines()[-1])["times"]
            for m, ts in t.items():
                r = [a / b for a, b in zip(ts, t["hf_sdpa"])]
                same[m] = f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
        else:
            print(
                f"{batch:>6} x {tokens:<6} same-process cycles failed: "
                f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}",
                flush=True,
            )
    return same


def _print_shape(
    batch: int, tokens: int, methods: list[str], runs: dict[str, list[dict]], same: dict[str, str]
) -> None:
    """One table row per method of one shape: its times and memory, and its ratios to hf_sdpa."""
    base = runs["hf_sdpa"]
    for method in methods:
        rs = runs[method]
        if not rs or not base:
            continue
        t = statistics.median(r["seconds"] for r in rs)
        mem = max(r["peak_gb"] for r in rs)
        tr = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(rs, base))
        mr = mem / max(b["peak_gb"] for b in base)
        print(
            f"{batch:>6} x {tokens:<6} {method:>10} {t:8.2f} {mem:8.2f} "
            f"{tr:16.2f}x {mr:7.2f}x {same.get(method, '-'):>24}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="only 4 x 512")
    ap.add_argument("--shape", help="only this BATCHxTOKENS, e.g. 1x4096")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of one process per method: peak memory (and per-process times)"
    )
    ap.add_argument(
        "--cycles",
        type=int,
        default=6,
        help="cycles of the methods alternating in one process: the time ratios (0: skip)",
    )
    ap.add_argument("--interleaved", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.interleaved:
            print(json.dumps(child_interleaved(args.child.split(","), args.batch, args.tokens, args.cycles)))
        else:
            print(json.dumps(child(args.child, args.batch, args.tokens, args.repeats)))
        return
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shape:
        b, t = args.shape.lower().split("x")
        shapes = [(int(b), int(t))]
    methods = args.methods.split(",")
    if methods[0] != "hf_sdpa":
        methods = ["hf_sdpa"] + [m for m in methods if m != "hf_sdpa"]
    print(
        f"peak memory: {args.rounds} round(s) of one process per method; "
        f"time: {args.cycles} cycles of the methods alternating in one "
        "process, each ratio against hf_sdpa of the same cycle (median, min-max); "
        "'process time/(a)': the per-process rounds"
    )
    print(
        f"{'batch x tokens':>15} {'method':>10} {'time s':>8} {'peak GB':>8} "
        f"{'process time/(a)':>17} {'mem/(a)':>8} {'time/(a), same process':>24}"
    )
    for batch, tokens in shapes:
        runs = _process_rounds(args, methods, batch, tokens)
        same = _same_process_ratios(args, methods, batch, tokens)
        _print_shape(batch, tokens, methods, runs, same)


if __name__ == "__main__":
    main()
