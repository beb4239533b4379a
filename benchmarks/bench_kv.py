"""KV-cache policies: the workbench's grid against kvpress (NVIDIA, PyPI 0.5.5) on the same items.

kvpress pins transformers < 5.3, so it runs from its own venv (``.venv-kvpress``, built by
``benchmarks/kvpress_peer/setup_venv.sh``) as a subprocess: this script writes the items (token
ids) and the presses x compression ratios to a JSON file, runs
``benchmarks/kvpress_peer/peer_loop.py`` with that venv's python (a practitioner's kvpress loop:
one prefill under ``with press(model):`` per item, press and ratio), and reads its rows back.

    python benchmarks/bench_kv.py [--model smollm2-135m] [--lengths 1024,2048] [--depths 0.1,0.5,0.9]
        [--ratios 0.5,0.75,0.9] [--n-loss 4] [--loss-len 1024] [--tail 256] [--threads 1] [--setup]

Items: niah prompts (``workbench.datasets.niah.make``, 5-digit answers), cut at the question (the
prompt's tail: ``meta["question_span"]`` when present, else the re-encoded ``meta["question"]``);
prose segments for the loss task. Presses: StreamingLLM (n_sink 4), SnapKV (window 64, kernel 5),
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


def question_span(prompt: Any, tokenizer: Any) -> tuple[int, int]:
    """[start, end) of the question: the prompt's tail (niah builds prompts from token pieces)."""
    if "question_span" in prompt.meta:
        s, e = prompt.meta["question_span"]
        return int(s), int(e)
    q = tokenizer(prompt.meta["question"], add_special_tokens=False)["input_ids"]
    n = len(prompt.tokens)
    if list(prompt.tokens[n - len(q) :]) != list(q):
        raise ValueError(f"{prompt.id}: the question is not the prompt's tail")
    return n - len(q), n


def niah_items(tokenizer: Any, lengths: list[int], depths: list[float], seed: int = 0) -> list[NiahItem]:
    from workbench.datasets import niah

    out = []
    for p in niah.make(tokenizer=tokenizer, context_len=lengths, depths=depths, answer_digits=5, seed=seed):
        qs, qe = question_span(p, tokenizer)
        a0, a1 = p.meta["answer_span"]
        out.append(
            NiahItem(
                id=p.id,
                context=list(p.tokens[:qs]),
                question=list(p.tokens[qs:qe]),
                answer_ids=list(p.tokens[a0:a1]),
                answer=str(p.meta["answer"]),
                length=int(p.meta["context_len"]),
                depth=float(p.meta["depth"]),
            )
        )
    return out


def loss_items(tokenizer: Any, n: int, length: int, tail: int, seed: int = 1) -> list[LossItem]:
    """``n`` prose segments of ``length`` tokens, from documents drawn with ``seed``."""
    from workbench.inputs.corpus import load_documents

    docs = load_documents("prose")
    rng = random.Random(seed)
    out: list[LossItem] = []
    while len(out) < n:
        i = rng.randrange(len(docs))
        ids: list[int] = []
        j = i
        while len(ids) < length:
            ids += tokenizer(docs[j % len(docs)]["text"] + "\n", add_special_tokens=False)["input_ids"]
            j += 1
        out.append(LossItem(id=f"prose-{seed}-{len(out)}-d{i}", tokens=ids[:length], tail=tail))
    return out


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
        if ok:
            row["loss"] = sum(r["loss"] for r in ok) / len(ok)
            if task == "niah":
                row["accuracy"] = sum(r["correct"] for r in ok) / len(ok)
        errs = sorted({r["error"].split("\n")[0][:160] for r in rows if "error" in r})
        if errs:
            row["error"] = errs
        out.append(row)
    return out


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
    ap.add_argument("--n-loss", type=int, default=4)
    ap.add_argument("--loss-len", type=int, default=1024)
    ap.add_argument("--tail", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--duo-sink", type=int, default=64)
    ap.add_argument("--duo-recent", type=int, default=256)
    ap.add_argument("--duo-scores", type=Path, default=None, help="JSON [layers][kv heads] of DuoAttention gates")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--setup", action="store_true", help="(re)build .venv-kvpress first")
    ap.add_argument("--peer-only", action="store_true", help="skip the workbench grid")
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_peer.json")
    return ap.parse_args(argv)


def build_items(args: argparse.Namespace, tokenizer: Any, n_layers: int, n_kv: int) -> Items:
    scores = json.loads(args.duo_scores.read_text()) if args.duo_scores else duo_scores(n_layers, n_kv)
    return Items(
        niah=niah_items(tokenizer, args.lengths, args.depths),
        loss=loss_items(tokenizer, args.n_loss, args.loss_len, args.tail) if args.n_loss else [],
        presses=press_specs(args.ratios, scores, args.duo_sink, args.duo_recent),
        protocols=args.protocols.split(","),
        max_new_tokens=args.max_new_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from workbench.models.embedded import embedded_folder

    torch.set_num_threads(args.threads)
    python = ensure_venv(args.setup)
    folder = embedded_folder(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = AutoConfig.from_pretrained(folder)
    items = build_items(args, tokenizer, cfg.num_hidden_layers, cfg.num_key_value_heads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / f"kv_peer_{args.model}"
    work.mkdir(exist_ok=True)
    items_path = write_items(items, work / "items.json")
    peer = run_peer(python, items_path, folder, work / "kvpress_rows.json", args.threads)
    score_peer(peer, items, tokenizer)
    summary = summarise_peer(peer)
    for row in summary:
        print(json.dumps(row))
    print(f"kvpress loop: {peer['wall_seconds']:.1f} s (load {peer['load_seconds']:.1f} s, threads {peer['threads']})")
    result = {
        "model": args.model,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "kvpress": {k: peer[k] for k in PEER_KEYS},
        "kvpress_summary": summary,
    }
    (work / "kvpress_rows.json").write_text(json.dumps(peer))
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
