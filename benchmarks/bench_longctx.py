"""Long-context scaling study: time and peak memory of head statistics against a bare forward.

For one model (``--model``: ``smollm2-135m`` by default, any name ``load_model`` knows or a
local HF folder, e.g. ``/root/.cache/workbench/models/gemma3-270m``), float32, batch 1, on real
prose, at each length T (``--lengths``, default 512,1024,2048,4096,8192):

  bare        transformers AutoModelForCausalLM, attn_implementation="sdpa", logits of the last
              position only (``logits_to_keep=1``): the fair baseline
  tl_cache    TransformerLens ``run_with_cache`` of every ``hook_pattern`` (+ entropy / sink
              from the cache); skipped where its predicted memory (the patterns plus one
              layer's eager attention: 4 bytes x (layers + 4) x heads x T^2) would pass
              ``--tl-max-gb`` (default 10) or what the machine has available: it is never
              run into an out-of-memory kill
  ours_fwd    the forward ``run_probes`` runs, no probe reading anything: the kernel asked for
              its lse, run per query block under long boolean masks (Gemma 3's sliding
              windows), which bare SDPA computes over every key, and ended after the last
              layer's attention (its MLP, the final norm and the head are read by no probe);
              the floor of ours_a
  ours_a      ``run_probes`` of sink, induction, streaming (statistics from the kernel's lse)
  ours_b      ours_a + entropy (one more attention pass with the keys as values)
  extra_pass  that one extra pass timed alone: the fused kernel on every layer's own queries
              and keys (captured first), keys as values; the floor of ours_b is bare + this

Peak memory: each (method, length) runs in its own process (``--rounds``), so a peak RSS is
that method's own (``peak``; ``run`` is the peak minus the resident memory once the model is
loaded, which leaves out the fixed cost of the imports: pandas for our tables, TransformerLens
and its bridge for ``tl_cache`` only, since our probe runs never boot it); ratios to ``bare`` are
taken within a round, then reported as min-max over rounds.

Time: a shared machine drifts by 20-50% between processes minutes apart, as much as the
overheads measured. So times come from one more process per length that loads both models and
alternates the methods (``--cycles``, the order rotated each cycle), every ratio taken against
the bare forward of the same cycle; reported as median and min-max over cycles. The
per-process times are printed too. Model loading is excluded from times.
Writes ``results.json`` and ``scaling.html`` (plotly: time and memory ratios against T) into
``--out``. GPU timings are not measured here: the CUDA kernels are the same code path, tested
only by simulation.

    python benchmarks/bench_longctx.py --rounds 2
    python benchmarks/bench_longctx.py --model /root/.cache/workbench/models/gemma3-270m \\
        --lengths 512,2048,8192,16384,32768 --methods bare,ours_a,ours_b,extra_pass
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ["bare", "tl_cache", "ours_fwd", "ours_a", "ours_b", "extra_pass"]
RATIOS = ["ours_b / (bare + extra_pass)", "ours_a / ours_fwd", "ours_b / (ours_fwd + extra_pass)"]  # floors, same cycle
PROBES = {"ours_a": ["sink", "induction", "streaming"], "ours_b": ["sink", "induction", "streaming", "entropy"]}


def available_gb() -> float:
    """MemAvailable from /proc/meminfo (GB), or infinity where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def tl_projected_gb(n_layers: int, n_heads: int, tokens: int) -> float:
    """Predicted peak of ``run_with_cache`` beyond the model (GB): the cached float32 patterns of
    every layer, plus one layer's transient eager attention (scores, mask, softmax, pattern
    copy: four more [heads, T, T] float32 tensors)."""
    return 4 * (n_layers + 4) * n_heads * tokens**2 / 2**30


def _ids(folder: str, tokens: int) -> list[int]:
    from transformers import AutoTokenizer

    from benchmarks.bench_extraction import real_text_ids

    return real_text_ids(AutoTokenizer.from_pretrained(folder), 1, tokens)[0]


def _extra_pass(wb, ids):
    """A function timing one fused attention pass per layer on the layer's own queries and keys,
    keys as values (what entropy adds), with the layers' calls captured beforehand. It runs as
    ours_b runs that pass (:func:`workbench.engine.kernels.attend`: the float mask built inside, query
    blocks under a long boolean mask)."""
    import torch

    from workbench.engine.attention import hooked_run
    from workbench.engine.call import base_network
    from workbench.engine.kernels import attend

    calls = []

    class Capture:
        def on_attention(self, call):
            calls.append(call)

    with hooked_run(wb.hf_model, Capture()):
        base_network(wb.hf_model)(input_ids=torch.tensor([ids]), use_cache=False)

    def run():
        for call in calls:
            q, k = call.query.float(), call.key.float()
            attend(call, (q, k, k))

    return run


def _our_forward(wb, ids):
    """The forward ``run_probes`` runs (plain HF modules, the fused kernel asked for its lse, in
    query blocks under long boolean masks), with no probe reading anything: what ours_a and
    ours_b would cost if their statistics were free."""
    import torch

    from workbench.engine.attention import hooked_run
    from workbench.engine.call import base_network, stop_after_layer

    x = torch.tensor([ids])

    class AsksForLse:
        def wants_statistics(self, call):
            return frozenset({"lse"})

    def run():
        with (
            hooked_run(wb.hf_model, AsksForLse(), unwrap=True),
            stop_after_layer(wb.n_layers - 1),
        ):  # as run_probes' forward
            base_network(wb.hf_model)(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)

    return run


def _runner(method: str, model: str, ids: list[int], loaded: dict):
    """A function running ``method`` once on ``ids`` (models loaded once into ``loaded``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench.models.loading import load_model, resolve_source

    if method == "bare":  # the plain HF model, never the one the bridge wraps
        if "hf" not in loaded:
            loaded["hf"] = AutoModelForCausalLM.from_pretrained(
                resolve_source(model)[0], attn_implementation="sdpa", dtype=torch.float32
            ).eval()
        hf, x = loaded["hf"], torch.tensor([ids])
        return lambda: hf(x, use_cache=False, logits_to_keep=1)
    if "wb" not in loaded:
        loaded["wb"] = load_model(model, device="cpu", dtype="float32")
    wb = loaded["wb"]
    if method == "tl_cache":
        x = torch.tensor([ids])
        wb.bridge  # booted here, not in the timed runs

        def run():
            _, cache = wb.bridge.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
            out = []
            for layer in range(wb.n_layers):
                a = cache[f"blocks.{layer}.attn.hook_pattern"].float()
                out.append((torch.special.entr(a).sum(-1)[..., 1:].mean((0, 2)), a[..., 0].mean((0, 2))))
            return out

        return run
    if method in PROBES:
        from probes import get_probe
        from workbench.inputs.prompts import TokenizedPrompt
        from workbench.runner import run_probes

        prompts = [TokenizedPrompt("0", ids)]
        return lambda: run_probes(wb, prompts, [get_probe(p) for p in PROBES[method]], batch_size=1, progress=False)
    if method == "extra_pass":
        return _extra_pass(wb, ids)
    if method == "ours_fwd":
        return _our_forward(wb, ids)
    raise SystemExit(f"unknown method {method}")


def child(method: str, model: str, tokens: int, repeats: int, warmup: bool = True) -> dict:
    import torch

    torch.set_grad_enabled(False)
    from workbench.models.loading import resolve_source

    ids = _ids(resolve_source(model)[0], tokens)
    run = _runner(method, model, ids, {})  # only this method's model in the process: its peak is its own
    loaded_gb = _rss_gb()
    from timing import median_time_and_peak

    seconds, peak_gb = median_time_and_peak(run, repeats, warmup)
    return {
        "method": method,
        "tokens": tokens,
        "seconds": seconds,
        "peak_gb": peak_gb,
        "run_gb": peak_gb - loaded_gb,
        "repeats": repeats,
        "warmup": warmup,
    }


def child_interleaved(methods: list[str], model: str, tokens: int, cycles: int, warmup: bool = True) -> dict:
    """Times of every method in one process, alternating (:func:`timing.alternating_times`), so
    the ratio to ``bare`` of the same cycle cancels a drift of the shared machine. Times only:
    peak memory needs a process per method (:func:`child`)."""
    import torch

    torch.set_grad_enabled(False)
    from timing import alternating_times

    from workbench.models.loading import resolve_source

    ids = _ids(resolve_source(model)[0], tokens)
    loaded: dict = {}
    runs = {m: _runner(m, model, ids, loaded) for m in methods}
    return {"tokens": tokens, "cycles": cycles, "warmup": warmup, "times": alternating_times(runs, cycles, warmup)}


def summarize_interleaved(results: list[dict]) -> list[dict]:
    """Per (tokens, method): the ratio to ``bare`` of the same cycle, median and min-max; and
    ours_b against its floor (bare + extra pass of the same cycle)."""
    import statistics

    out = []
    for r in results:
        t = r["times"]
        base = t["bare"]
        for m, ts in t.items():
            ratios = [a / b for a, b in zip(ts, base)]
            out.append(
                {
                    "tokens": r["tokens"],
                    "method": m,
                    "n": len(ratios),
                    "median_seconds": statistics.median(ts),
                    "time_ratio": [min(ratios), max(ratios)],
                    "median_ratio": statistics.median(ratios),
                }
            )
        if "ours_b" in t and "extra_pass" in t:
            fr = [b_ / (a + e) for b_, a, e in zip(t["ours_b"], base, t["extra_pass"])]
            out.append(
                {
                    "tokens": r["tokens"],
                    "method": "ours_b / (bare + extra_pass)",
                    "n": len(fr),
                    "time_ratio": [min(fr), max(fr)],
                    "median_ratio": statistics.median(fr),
                }
            )
        if "ours_fwd" in t:  # the statistics' own cost, on our forward of the same cycle
            for m, floor in (
                ("ours_a", t["ours_fwd"]),
                ("ours_b", [f + e for f, e in zip(t["ours_fwd"], t.get("extra_pass", []))]),
            ):
                if m in t and len(floor) == len(t[m]):
                    fr = [a / f for a, f in zip(t[m], floor)]
                    name = "ours_a / ours_fwd" if m == "ours_a" else "ours_b / (ours_fwd + extra_pass)"
                    out.append(
                        {
                            "tokens": r["tokens"],
                            "method": name,
                            "n": len(fr),
                            "time_ratio": [min(fr), max(fr)],
                            "median_ratio": statistics.median(fr),
                        }
                    )
    return out


def _rss_gb() -> float:
    """Resident memory now (GB): the model is loaded (its weights mostly not yet paged in)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def model_shape(model: str) -> tuple[int, int]:
    from transformers import AutoConfig

    from workbench.models.loading import resolve_source

    cfg = AutoConfig.from_pretrained(resolve_source(model)[0]).get_text_config()
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)


def summarize(runs: list[dict]) -> list[dict]:
    """Per (tokens, method): time and memory ratios to bare of the same round, min-max."""
    out = []
    for tokens in sorted({r["tokens"] for r in runs}):
        at = [r for r in runs if r["tokens"] == tokens]
        base = {r["round"]: r for r in at if r["method"] == "bare"}
        for method in METHODS:
            rs = [r for r in at if r["method"] == method and r["round"] in base]
            if not rs:
                continue
            tr = [r["seconds"] / base[r["round"]]["seconds"] for r in rs]
            mr = [r["peak_gb"] / base[r["round"]]["peak_gb"] for r in rs]
            rr = [r["run_gb"] / base[r["round"]]["run_gb"] for r in rs]
            out.append(
                {
                    "tokens": tokens,
                    "method": method,
                    "n": len(rs),
                    "seconds": [min(r["seconds"] for r in rs), max(r["seconds"] for r in rs)],
                    "peak_gb": [min(r["peak_gb"] for r in rs), max(r["peak_gb"] for r in rs)],
                    "time_ratio": [min(tr), max(tr)],
                    "mem_ratio": [min(mr), max(mr)],
                    "run_mem_ratio": [min(rr), max(rr)],
                }
            )
        extra = {r["round"]: r for r in at if r["method"] == "extra_pass"}
        b_runs = [r for r in at if r["method"] == "ours_b" and r["round"] in base and r["round"] in extra]
        if b_runs:  # (b) against its floor, bare + one extra pass, round by round
            fr = [r["seconds"] / (base[r["round"]]["seconds"] + extra[r["round"]]["seconds"]) for r in b_runs]
            out.append(
                {
                    "tokens": tokens,
                    "method": "ours_b / (bare + extra_pass)",
                    "n": len(fr),
                    "time_ratio": [min(fr), max(fr)],
                }
            )
    return out


def figure(summary: list[dict], title: str, path: Path, interleaved: list[dict] | None = None) -> None:
    """Time (from the interleaved timing when there is one) and peak memory ratios against T."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("time / bare forward", "peak memory / bare forward"))
    for method in [m for m in METHODS if m != "bare"] + RATIOS:
        for col, key in ((1, "time_ratio"), (2, "mem_ratio")):
            source = (
                interleaved if col == 1 and interleaved and any(s["method"] == method for s in interleaved) else summary
            )
            rows = [s for s in source if s["method"] == method and key in s]
            if not rows or (key == "mem_ratio" and method == "extra_pass"):
                continue
            x = [s["tokens"] for s in rows]
            lo = [s[key][0] for s in rows]
            hi = [s[key][1] for s in rows]
            mid = [s.get("median_ratio", (a + b) / 2) for s, a, b in zip(rows, lo, hi)]
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=mid,
                    mode="lines+markers",
                    name=method,
                    legendgroup=method,
                    showlegend=col == 1,
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=[h - m for h, m in zip(hi, mid)],
                        arrayminus=[m - lo_ for m, lo_ in zip(mid, lo)],
                    ),
                ),
                row=1,
                col=col,
            )
    for col, target in ((1, 1.10), (2, 1.10)):
        fig.add_hline(y=target, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_xaxes(type="log", title_text="tokens (T)")
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=title, height=480, width=1100)
    fig.write_html(path, include_plotlyjs="cdn")


def _run_child(argv: list[str]) -> tuple[dict | None, str]:
    """This script in a fresh process with ``argv``: (the JSON it prints last, "") or (None, why
    it failed: killed, or its last line of stderr)."""
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, "killed (out of memory?)" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[
            -1
        ]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def _process_rounds(
    args: argparse.Namespace,
    methods: list[str],
    tokens: int,
    shape: tuple[int, int],
    runs: list[dict],
    notes: list[str],
) -> None:
    """``--rounds`` rounds of one child process per method at ``tokens``, appended to ``runs``
    (tl_cache skipped where its predicted memory is over the limit; skips and failures to ``notes``)."""
    n_layers, n_heads = shape
    for rnd in range(args.rounds):
        for method in methods:
            if method == "tl_cache":
                need = tl_projected_gb(n_layers, n_heads, tokens)
                if need > min(args.tl_max_gb, available_gb() - 2):
                    note = (
                        f"tl_cache at T={tokens} skipped: predicted {need:.1f} GB "
                        "(cached patterns + one layer's eager attention) > "
                        f"{min(args.tl_max_gb, available_gb() - 2):.1f} GB allowed"
                    )
                    if note not in notes:
                        notes.append(note)
                        print(note, flush=True)
                    continue
            repeats = args.repeats or max(1, 4096 // tokens)
            r, why = _run_child(
                [
                    "--child",
                    method,
                    "--model",
                    args.model,
                    "--tokens",
                    str(tokens),
                    "--repeats",
                    str(repeats),
                    "--warmup-max",
                    str(args.warmup_max),
                ]
            )
            if r is None:
                print(f"T={tokens:<6} round {rnd} {method:>10} failed: {why}", flush=True)
                notes.append(f"{method} at T={tokens} failed: {why}")
                continue
            r |= {"round": rnd}
            runs.append(r)
            print(
                f"T={tokens:<6} round {rnd} {method:>10} {r['seconds']:9.2f} s  peak {r['peak_gb']:6.2f} GB"
                f"  (run {r['run_gb']:5.2f} GB)",
                flush=True,
            )


def _interleaved_timing(
    args: argparse.Namespace, methods: list[str], tokens: int, interleaved: list[dict], notes: list[str]
) -> None:
    """One child process alternating every method but tl_cache at ``tokens`` (``--cycles``),
    appended to ``interleaved`` (a failure to ``notes``)."""
    timed = [m for m in methods if m != "tl_cache"]
    if args.cycles and len(timed) > 1:
        r, why = _run_child(
            [
                "--child-interleaved",
                ",".join(timed),
                "--model",
                args.model,
                "--tokens",
                str(tokens),
                "--cycles",
                str(args.cycles),
                "--warmup-max",
                str(args.warmup_max),
            ]
        )
        if r is None:
            print(f"T={tokens:<6} interleaved failed: {why}", flush=True)
            notes.append(f"interleaved timing at T={tokens} failed: {why}")
        else:
            interleaved.append(r)
            print(
                f"T={tokens:<6} interleaved "
                + "  ".join(f"{m} {min(ts):.2f}-{max(ts):.2f} s" for m, ts in r["times"].items()),
                flush=True,
            )


def _print_tables(args: argparse.Namespace, runs: list[dict], interleaved: list[dict], out: Path) -> None:
    """The closing tables: ratios to bare per process, then in one process, and where the results are."""
    print(f"\n{'T':>6} {'method':>34} {'time / bare':>14} {'peak / bare':>14} {'run / bare':>14}")
    for s in summarize(runs):
        mem = f"{s['mem_ratio'][0]:.2f}-{s['mem_ratio'][1]:.2f}x" if "mem_ratio" in s else ""
        run_mem = f"{s['run_mem_ratio'][0]:.2f}-{s['run_mem_ratio'][1]:.2f}x" if "run_mem_ratio" in s else ""
        print(
            f"{s['tokens']:>6} {s['method']:>34} "
            f"{s['time_ratio'][0]:6.2f}-{s['time_ratio'][1]:.2f}x {mem:>14} {run_mem:>14}"
        )
    if interleaved:
        print(f"\ntime in one process, methods alternating ({args.cycles} cycles; ratio to bare of the same cycle)")
        print(f"{'T':>6} {'method':>34} {'median':>8} {'min-max':>14}")
        for s in summarize_interleaved(interleaved):
            print(
                f"{s['tokens']:>6} {s['method']:>34} {s['median_ratio']:7.2f}x "
                f"{s['time_ratio'][0]:6.2f}-{s['time_ratio'][1]:.2f}x"
            )
    print(f"\nwrote {out / 'results.json'} and {out / 'scaling.html'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-interleaved", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed repeats per process after one warm-up (median); 0: 4096 // T, at least 1",
    )
    ap.add_argument("--rounds", type=int, default=2, help="rounds of one process per method (peak memory, and times)")
    ap.add_argument(
        "--cycles",
        type=int,
        default=3,
        help="cycles of the one-process interleaved timing per length (every method but tl_cache); 0: none",
    )
    ap.add_argument("--tl-max-gb", type=float, default=10.0)
    ap.add_argument(
        "--warmup-max", type=int, default=8192, help="warm up (one untimed run) only up to this many tokens"
    )
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/out/longctx-MODEL)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens, args.repeats, args.tokens <= args.warmup_max)))
        return
    if args.child_interleaved:
        print(
            json.dumps(
                child_interleaved(
                    args.child_interleaved.split(","),
                    args.model,
                    args.tokens,
                    args.cycles,
                    args.tokens <= args.warmup_max,
                )
            )
        )
        return
    methods = args.methods.split(",")
    methods = ["bare"] + [m for m in methods if m != "bare"]
    lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"longctx-{Path(args.model).name}")
    out.mkdir(parents=True, exist_ok=True)
    n_layers, n_heads = model_shape(args.model)
    runs: list[dict] = []
    interleaved: list[dict] = []
    notes: list[str] = []
    print(
        f"model {args.model}: {n_layers} layers x {n_heads} heads; rounds {args.rounds}; cpu threads {os.cpu_count()}"
    )
    for tokens in lengths:
        _process_rounds(args, methods, tokens, (n_layers, n_heads), runs, notes)
        _interleaved_timing(args, methods, tokens, interleaved, notes)
        summary = summarize(runs)
        inter = summarize_interleaved(interleaved)
        (out / "results.json").write_text(
            json.dumps(
                {
                    "model": args.model,
                    "runs": runs,
                    "summary": summary,
                    "interleaved": interleaved,
                    "interleaved_summary": inter,
                    "notes": notes,
                },
                indent=1,
            )
        )
        figure(
            summary,
            f"{args.model}: head statistics against a bare SDPA forward (CPU, float32, batch 1)",
            out / "scaling.html",
            inter,
        )
    _print_tables(args, runs, interleaved, out)


if __name__ == "__main__":
    main()
