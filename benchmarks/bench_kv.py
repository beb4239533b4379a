"""KV-cache policies: the workbench's grid against kvpress (NVIDIA, PyPI 0.5.5) on the same items.

kvpress pins transformers < 5.3, so it runs from its own venv (``.venv-kvpress``, built by
``benchmarks/kvpress_peer/setup_venv.sh``) as a subprocess: this script writes the items (token
ids) and the presses x compression ratios to a JSON file, runs
``benchmarks/kvpress_peer/peer_loop.py`` with that venv's python (a practitioner's kvpress loop:
one prefill under ``with press(model):`` per item, press and ratio), and reads its rows back.

    python benchmarks/bench_kv.py [--model smollm2-135m] [--lengths 1024,2048] [--depths 0.1,0.5,0.9]
        [--ratios 0.5,0.75,0.9] [--n-loss 4] [--loss-len 1024] [--tail 256] [--threads 1] [--setup]
        [--peer-only]

Prints, per press x ratio x protocol: how often both give the same niah verdict (and the same
decoded text), the largest |loss difference| on the prose segments, and the time of the whole
workbench grid (``workbench.kv.grid.run_unit`` over every unit, prefills shared across budgets)
against the kvpress loop, measured in the same run with the same thread count.

Items: the grid's own (``workbench.kv.grid.niah_items``: niah prompts with 5-digit answers cut where
the question starts; ``loss_segments``: prose segments whose last ``--tail`` tokens are scored).
Presses: StreamingLLM (n_sink 4), SnapKV (window 64, kernel 5),
DuoAttention with our own per-KV-head scores (seeded uniform draws, distinct; the workbench's
selectors can supply real ones with ``--duo-scores FILE``), sink 64 / recent 256. Budgets: the same
compression ratios for all presses (Duo: the fraction of streaming KV heads). Results in
``benchmarks/results/kv_peer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kvpress_peer.mapping import (  # noqa: E402
    Items,
    LossItem,
    NiahItem,
    answer_correct,
    write_items,
)

PEER = ROOT / "benchmarks" / "kvpress_peer"
VENV = ROOT / ".venv-kvpress"
RESULTS = ROOT / "benchmarks" / "results"
PEER_KEYS = ("wall_seconds", "load_seconds", "threads", "versions", "model_class", "n_errors")


def ensure_venv(setup: bool) -> Path:
    python = VENV / "bin" / "python"
    if not python.exists() or setup:
        subprocess.run(["bash", str(PEER / "setup_venv.sh")], check=True)
    return python


def duo_scores(n_layers: int, n_kv: int, seed: int = 0) -> list[list[float]]:
    """Stand-in DuoAttention gates: distinct uniform draws in [0, 1) per (layer, KV head)."""
    rng = random.Random(seed)
    return [[rng.random() for _ in range(n_kv)] for _ in range(n_layers)]


def press_specs(ratios: list[float], scores: list[list[float]], sink: int, recent: int) -> list[dict]:
    return [
        {"name": "streaming_llm", "ratios": ratios, "n_sink": 4},
        {"name": "snapkv", "ratios": ratios, "window_size": 64, "kernel_size": 5},
        {"name": "duo_attention", "ratios": ratios, "head_scores": scores, "sink": sink, "recent": recent},
    ]


def run_peer(python: Path, items_path: Path, model_dir: Path, out: Path, threads: int) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    cmd = [str(python), str(PEER / "peer_loop.py"), str(items_path), str(model_dir), str(out)]
    cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=True, env=env)
    res = json.loads(out.read_text())
    res["subprocess_seconds"] = time.perf_counter() - t0
    return res


def score_peer(res: dict, items: Items, tokenizer: Any) -> None:
    """Add the decoded text and the niah accuracy to each kvpress row (decoded on this side)."""
    answers = {it.id: it.answer for it in items.niah}
    for r in res["rows"]:
        if r["task"] == "niah" and "generated" in r:
            r["text"] = tokenizer.decode(r["generated"], skip_special_tokens=True)
            r["correct"] = answer_correct(r["text"], answers[r["item"]])


def summarise_peer(res: dict) -> list[dict]:
    """Per (press, ratio, protocol, task): accuracy or mean loss over items, errors counted."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in res["rows"]:
        groups[(r["press"], r["ratio"], r["protocol"], r["task"])].append(r)
    out = []
    for (press, ratio, proto, task), rows in sorted(groups.items()):
        ok = [r for r in rows if "error" not in r]
        row = {"press": press, "ratio": ratio, "protocol": proto, "task": task, "n": len(rows)}
        row["errors"] = len(rows) - len(ok)
        if ok and all("loss" in r for r in ok):
            row["loss"] = sum(r["loss"] for r in ok) / len(ok)
        if ok:
            if task == "niah":
                row["accuracy"] = sum(r["correct"] for r in ok) / len(ok)
        errs = sorted({r["error"].split("\n")[0][:160] for r in rows if "error" in r})
        if errs:
            row["error"] = errs
        out.append(row)
    return out


def grid_items(model: Any, spec: Any) -> tuple[list[NiahItem], list[LossItem]]:
    """The workbench grid's own items (``workbench.kv.grid.niah_items`` / ``loss_segments``), with the
    answer's token ids from the same ``niah.make`` call, as the peer's items."""
    from workbench.datasets import niah
    from workbench.kv import grid

    niah_out: list[NiahItem] = []
    for length in spec.lengths:
        prompts = niah.make(
            tokenizer=model.tokenizer, context_len=[length], depths=spec.depths, seed=spec.seed, n_ctx=model.n_ctx
        )
        for it, p in zip(grid.niah_items(model, spec, length), prompts):
            if it.context + it.question != list(p.tokens) or it.id != p.id:
                raise ValueError(f"{p.id}: the grid's item is not the niah prompt")
            a0, a1 = p.meta["answer_span"]
            niah_out.append(
                NiahItem(it.id, it.context, it.question, list(p.tokens[a0:a1]), it.answer, it.length, it.depth)
            )
    segs = grid.loss_segments(model, spec) if "loss" in spec.tasks else []
    loss_out = [LossItem(f"segment-{r}", list(s), spec.loss_tail) for r, s in enumerate(segs)]
    return niah_out, loss_out


def peer_points(geom: Any, presses: list[dict]) -> list[Any]:
    """The workbench policies equal to each kvpress press x ratio (full cache first), as grid points:
    StreamingLLM -> Window(n_sink, n_kept - n_sink); SnapKV -> Budget(n_kept - window, window,
    kernel, "avg"); DuoAttention -> Window(sink, recent) on its streaming KV heads, Full elsewhere.
    Sliding-window layers stay as the model has them: kvpress compresses them too on Gemma3ForCausalLM,
    by cache slot rather than position, which the workbench does not copy (docs: kv_kvpress.md)."""
    from benchmarks.kvpress_peer.mapping import duo_streaming_heads, snapkv_budget, streaming_window
    from workbench.kv import selectors as sel
    from workbench.kv.grid import Point
    from workbench.kv.policy import FULL, Budget, CachePolicy, Window

    every = [(layer, kv) for layer in geom.global_layers for kv in range(geom.n_kv_heads)]

    def make(spec: dict, ratio: float):
        name = spec["name"]

        def policy_for(n: int) -> CachePolicy:
            if name == "streaming_llm":
                heads = dict.fromkeys(every, Window(**streaming_window(n, ratio, spec["n_sink"])))
            elif name == "snapkv":
                budget = snapkv_budget(n, ratio, spec["window_size"], spec["kernel_size"])
                heads = dict.fromkeys(every, Budget(**budget))
            else:
                streaming = set(duo_streaming_heads(spec["head_scores"], ratio))
                heads = {h: (Window(spec["sink"], spec["recent"]) if h in streaming else FULL) for h in every}
            return CachePolicy(
                geom, heads, name=policy_name(name, ratio), selector=name, budget=1 - ratio)

        return policy_for

    pts = [Point("full", 1.0, -1, lambda n: sel.full(geom))]
    for spec in presses:
        pts += [Point(spec["name"], 1 - r, -1, make(spec, r)) for r in spec["ratios"]]
    return pts


def policy_name(press: str, ratio: float) -> str:
    return "full" if press == "none" else f"kvpress-{press}@{ratio:g}"


def run_grid(model: Any, spec: Any, points: list[Any]) -> tuple[Any, float]:
    """Every unit of the grid (task x length x protocol) through ``workbench.kv.grid.run_unit``."""
    import pandas as pd

    from workbench.kv.grid import run_unit

    t0 = time.perf_counter()
    frames = []
    if "niah" in spec.tasks:
        for protocol in spec.protocols:
            for length in spec.lengths:
                frames.append(run_unit(model, spec, points, "niah", length, protocol))
    if "loss" in spec.tasks:
        frames.append(run_unit(model, spec, points, "loss", spec.loss_length, "question-agnostic"))
    return pd.concat(frames, ignore_index=True), time.perf_counter() - t0


def compare(peer: dict, frame: Any) -> list[dict]:
    """Per (press, ratio, protocol, task): how often the two agree on the niah answer (correct or
    not; and on the whole decoded text), and the largest |loss difference| on the prose segments."""
    ours = {}
    for r in frame.itertuples():
        if r.metric in ("accuracy", "loss"):
            ours[(r.policy, r.protocol, r.task, r.item)] = (r.value, r.response)
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for r in peer["rows"]:
        key = (policy_name(r["press"], r["ratio"]), r["protocol"], r["task"], r["item"])
        groups[(r["press"], r["ratio"], r["protocol"], r["task"])].append((r, ours.get(key)))
    out = []
    for (press, ratio, proto, task), pairs in sorted(groups.items()):
        both = [(p, o) for p, o in pairs if o is not None and "error" not in p]
        row: dict[str, Any] = {"press": press, "ratio": ratio, "protocol": proto, "task": task, "n": len(both)}
        row["kvpress_errors"] = sum("error" in p for p, _ in pairs)
        if task == "niah" and both:
            row["answer_agreement"] = sum(float(p["correct"]) == o[0] for p, o in both) / len(both)
            row["text_agreement"] = sum(p["text"] == o[1] for p, o in both) / len(both)
            row["accuracy_kvpress"] = sum(p["correct"] for p, _ in both) / len(both)
            row["accuracy_workbench"] = sum(o[0] for _, o in both) / len(both)
        if task == "loss" and both:
            row["max_abs_loss_diff"] = max(abs(p["loss"] - o[0]) for p, o in both)
            row["loss_kvpress"] = sum(p["loss"] for p, _ in both) / len(both)
            row["loss_workbench"] = sum(o[0] for _, o in both) / len(both)
        out.append(row)
    return out


def check_duo_masks(peer: dict, presses: list[dict]) -> int:
    """Rows whose kvpress streaming mask differs from ours (``duo_streaming_heads``): must be 0."""
    from benchmarks.kvpress_peer.mapping import duo_streaming_heads

    spec = next((p for p in presses if p["name"] == "duo_attention"), None)
    bad = 0
    for r in peer["rows"]:
        if r["press"] == "duo_attention" and "streaming_mask" in r:
            mask = r["streaming_mask"]
            theirs = sorted((layer, kv) for layer, row in enumerate(mask) for kv, m in enumerate(row) if m)
            bad += theirs != duo_streaming_heads(spec["head_scores"], r["ratio"])
    return bad


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=_ints, default=[1024, 2048])
    ap.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9])
    ap.add_argument("--ratios", type=_floats, default=[0.5, 0.75, 0.9])
    ap.add_argument("--protocols", default="question-agnostic,question-aware")
    ap.add_argument("--tasks", default="niah,loss")
    ap.add_argument("--n-loss", type=int, default=4)
    ap.add_argument("--loss-len", type=int, default=1024)
    ap.add_argument("--tail", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--duo-sink", type=int, default=64)
    ap.add_argument("--duo-recent", type=int, default=256)
    ap.add_argument("--duo-scores", type=Path, default=None, help="JSON [layers][kv heads] of DuoAttention gates")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--score-answers", action="store_true", help="kvpress rows also get the answer's NLL")
    ap.add_argument("--setup", action="store_true", help="(re)build .venv-kvpress first")
    ap.add_argument("--peer-only", action="store_true", help="skip the workbench grid")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_peer.json")
    return ap.parse_args(argv)


def grid_spec(args: argparse.Namespace) -> Any:
    from workbench.kv.grid import GridSpec

    return GridSpec(
        selectors=["full"],
        tasks=args.tasks.split(","),
        protocols=args.protocols.split(","),
        lengths=args.lengths,
        depths=args.depths,
        loss_length=args.loss_len,
        loss_tail=args.tail,
        loss_segments=args.n_loss,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import tempfile

    import torch

    from workbench import load_model
    from workbench.kv.policy import geometry
    from workbench.models.embedded import embedded_folder

    torch.set_num_threads(args.threads)
    python = ensure_venv(args.setup)
    folder = embedded_folder(args.model)
    model = load_model(args.model)
    geom = geometry(model)
    spec = grid_spec(args)
    niah_list, loss_list = grid_items(model, spec)
    scores = json.loads(args.duo_scores.read_text()) if args.duo_scores else duo_scores(geom.n_layers, geom.n_kv_heads)
    items = Items(
        niah=niah_list if "niah" in spec.tasks else [],
        loss=loss_list,
        presses=press_specs(args.ratios, scores, args.duo_sink, args.duo_recent),
        protocols=list(spec.protocols),
        max_new_tokens=args.max_new_tokens,
        score_answers=args.score_answers,
    )
    with tempfile.TemporaryDirectory() as tmp:
        items_path = write_items(items, Path(tmp) / "items.json")
        peer = run_peer(python, items_path, folder, Path(tmp) / "kvpress_rows.json", args.threads)
    score_peer(peer, items, model.tokenizer)
    result: dict[str, Any] = {
        "model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kvpress": {k: peer[k] for k in PEER_KEYS},
        "kvpress_summary": summarise_peer(peer),
        "duo_mask_mismatches": check_duo_masks(peer, items.presses),
    }
    print(f"kvpress loop: {peer['wall_seconds']:.1f} s (load {peer['load_seconds']:.1f} s, threads {peer['threads']})")
    if not args.peer_only:
        frame, t_grid = run_grid(model, spec, peer_points(geom, items.presses))
        result["workbench_seconds"] = t_grid
        result["speedup"] = peer["wall_seconds"] / t_grid
        result["comparison"] = compare(peer, frame)
        for row in result["comparison"]:
            print(json.dumps(row))
        print(
            f"whole grid (workbench) {t_grid:.1f} s vs kvpress loop {peer['wall_seconds']:.1f} s: "
            f"{result['speedup']:.2f}x, same items, same run, {torch.get_num_threads()} thread(s)"
        )
    else:
        for row in result["kvpress_summary"]:
            print(json.dumps(row))
    result["kvpress_rows"] = [
        {k: v for k, v in r.items() if k not in ("traceback", "streaming_mask")} for r in peer["rows"]
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
