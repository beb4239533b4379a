"""Memory of a pattern view on a long prompt against the bare forward (issue 34, item 2).

One prompt of ``--length`` tokens (default 8192) on ``--model`` (default ``smollm2-135m``, float32,
batch 1, one thread), each method in its own process, ``--rounds`` times:

  bare      the loaded model with ``attn_implementation="sdpa"``, ``model(ids, logits_to_keep=1)``
            under ``torch.inference_mode()``: what a practitioner runs for one forward (SDPA, no
            ``[query, key]`` tensor; the logits of the last position only)
  bare_net  the same without the head: the network alone (``model.model``), which is what a
            pattern view runs; the baseline of the forward's own memory (``run``)
  ours_fwd  the workbench's hooked forward with no observer (the network without its head)
  ours_rows ``workbench.engine.rows.attention_rows`` of ``--heads`` (default 3 heads in the
            first, middle and last layer) at the last ``--rows`` query positions (default 16)
  tl_cache  (predicted, not run) what TransformerLens' ``run_with_cache`` would hold for a
            CircuitsVis view: every layer's ``[head, query, key]`` pattern in float32

How memory is read. Each process loads the model, runs the method once on 16 tokens (imports and
first-call set-up are not the forward's memory), then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and runs the long prompt; ``peak`` is the process' peak RSS after
that, ``run`` the peak minus the resident memory just before the long forward. glibc keeps freed
blocks under its mmap threshold (up to 32 MB) in the heap, so a process' peak RSS depends on the
order in which it freed them: with the default allocator the same forward read 333 MB in one
process and 390 MB in another. The processes therefore run with ``MALLOC_MMAP_THRESHOLD_=65536``
(every larger block is its own mapping, returned on free), so RSS follows the live tensors;
``--default-malloc`` measures without it. Ratios are taken within a round: ``peak`` against
``bare`` (what the machine must have), ``run`` against ``bare_net`` (the forward's own memory;
``bare``'s ``run`` is smaller because its warm-up leaves ~90 MB of the head's set-up resident,
which then counts in its ``before``).

Only what the view keeps grows with the request: ``heads x rows x keys`` float32 values (1.5 MB
here) plus one block of scores (at most ``CHUNK_ELEMENTS``). Not measured: a GPU (the same code
path; the CUDA allocator's peak would be read with ``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_pattern_memory.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

METHODS = ("bare", "bare_net", "ours_fwd", "ours_rows")


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _run(method: str, model, ids, heads, rows: int) -> None:
    import torch

    if method == "bare":
        model.hf_model.config._attn_implementation = "sdpa"
        with torch.inference_mode():
            model.hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
    elif method == "bare_net":
        from workbench.engine.call import base_network

        model.hf_model.config._attn_implementation = "sdpa"
        with torch.inference_mode():
            base_network(model.hf_model)(input_ids=ids, use_cache=False)
    elif method == "ours_fwd":
        from workbench.engine.attention import hooked_run
        from workbench.engine.call import base_network

        with hooked_run(model.hf_model, unwrap=True):
            base_network(model.hf_model)(input_ids=ids, use_cache=False)
    else:
        from workbench.engine.rows import attention_rows

        n = ids.shape[1]
        attention_rows(model, ids[0].tolist(), heads, list(range(max(0, n - rows), n)))


def child(args: argparse.Namespace) -> None:
    """One method in this process: print one JSON line with its peak and run memory."""
    import torch

    torch.set_num_threads(1)
    from workbench.models import load_model

    model = load_model(args.model)
    heads = _heads(args.heads, model.n_layers, model.n_heads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(40000, model.vocab_size), (1, args.length), generator=gen)
    _run(args.method, model, ids[:, :16], heads, args.rows)  # warm-up
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss("VmRSS")
    _run(args.method, model, ids, heads, args.rows)
    peak = _rss("VmHWM")
    print(json.dumps({"method": args.method, "before_mb": before, "peak_mb": peak, "run_mb": peak - before}))


def _heads(raw: str | None, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    if raw:
        return [tuple(int(x) for x in p.split(".")) for p in raw.split(",")]  # type: ignore[misc]
    return [(0, 0), (n_layers // 2, n_heads // 2), (n_layers - 1, n_heads - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", default=None, help="LAYER.HEAD,... (default: first, middle, last layer)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--default-malloc", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pattern_memory.json"))
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not args.default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    rounds = []
    for r in range(args.rounds):
        got = {}
        for m in METHODS:
            cmd = [sys.executable, __file__, "--method", m, "--model", args.model, "--length", str(args.length)]
            cmd += ["--rows", str(args.rows)] + (["--heads", args.heads] if args.heads else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            got[m] = json.loads(out.strip().splitlines()[-1])
            print(f"round {r}: {m:9s} peak {got[m]['peak_mb']:7.0f} MB  run {got[m]['run_mb']:6.0f} MB", flush=True)
        for m in METHODS:
            got[m]["peak_ratio"] = got[m]["peak_mb"] / got["bare"]["peak_mb"]
            got[m]["run_ratio"] = got[m]["run_mb"] / got["bare_net"]["run_mb"]
        rounds.append(got)
    from workbench.models import load_model

    model = load_model(args.model)
    tl_gb = 4 * model.n_layers * model.n_heads * args.length**2 / 1e9
    kept_mb = 4 * len(_heads(args.heads, model.n_layers, model.n_heads)) * args.rows * args.length / 1e6
    summary = {
        "model": args.model,
        "length": args.length,
        "rows": args.rows,
        "malloc_mmap_threshold": None if args.default_malloc else 65536,
        "kept_rows_mb": kept_mb,
        "tl_cache_patterns_gb_predicted": tl_gb,
        "rounds": rounds,
    }
    for m in METHODS:
        runs = [g[m]["run_ratio"] for g in rounds]
        peaks = [g[m]["peak_ratio"] for g in rounds]
        print(f"{m:9s} peak/bare {min(peaks):.3f}-{max(peaks):.3f}  run/bare_net {min(runs):.3f}-{max(runs):.3f}")
    print(f"kept rows: {kept_mb:.1f} MB; run_with_cache's patterns alone would be {tl_gb:.0f} GB")
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
