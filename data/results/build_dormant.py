"""Active-dormant heads on SmolLM2-135M and Gemma-3-270M across three domains (issue 31, item 4).

    python data/results/build_dormant.py                         # both models, every head (slow)
    python data/results/build_dormant.py --n-prompts 8 --tokens 64 --select 9   # what the shipped files hold,
    python data/results/build_dormant.py --n-prompts 8 --tokens 64 --models smollm2-135m --control 6  # then this

On a shared 2-core machine one redirected forward of 8 x 64 tokens took ~20 s (SmolLM2) to ~30 s
(Gemma: its 262k-token vocabulary), so every head on every domain (810 forwards for SmolLM2) did not
fit the time available. ``--select K`` screens first: ``first_token_attention`` of every head on
every domain (one attention-only forward per domain), then redirects only the K heads whose
first-token attention differs most between domains (max - min), the candidates for active-dormant.

For each model and each domain (``prose``, ``code``, ``repeated-random``): ``--n-prompts`` prompts of
the dataset (seed 0), each cut to exactly ``--tokens`` tokens as the model's tokenizer gives them
(BOS first for Gemma; repeated-random: period tokens/2, two copies), and the ``dormant`` probe
(probes/dormant.py) over every head (or ``--layers``, or the ``--select`` ones), all prompts in one batch per forward:
``dormancy_dloss`` (loss change, nats, when the head's attention is all on the first token) and
``first_token_attention``. Then :func:`probes.dormant.active_dormant` lists the heads dormant on one
domain (|dloss| <= ``--dormant-below``) and active on another (dloss >= ``--active-above``).

Writes ``data/results/dormant.parquet`` (the tidy rows of every run: model, dataset, probe, metric,
layer, head, value, n) and ``data/results/dormant.json`` (settings, base losses, timings, the
active-dormant heads with their numbers, and the heads of largest effect per domain). A model
already in the parquet is kept unless it is run again (so the models can be run one at a time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from probes.dormant import DLOSS, FIRST, DormantProbe, FirstTokenAttention, active_dormant
from workbench import load_model
from workbench.datasets import make_dataset
from workbench.engine.extraction import run_pattern_probes
from workbench.inputs.prompts import TokenizedPrompt, tokenize_prompts
from workbench.protocol.run_context import RunContext
from workbench.protocol.table import tidy
from workbench.runner import run_probes

HERE = Path(__file__).resolve().parent
DOMAINS = ("prose", "code", "repeated-random")
OPTIONS = {"prose": {"min_words": 150, "max_words": 200}, "code": {"min_lines": 40, "max_lines": 60}}


def domain_prompts(model, domain: str, n_prompts: int, tokens: int) -> list[TokenizedPrompt]:
    """``n_prompts`` prompts of ``domain``, each exactly ``tokens`` tokens long."""
    options = OPTIONS.get(domain, {"period": tokens // 2, "repeats": 2})
    raw = make_dataset(domain, n_prompts, seed=0, tokenizer=model.tokenizer, **options)
    out = tokenize_prompts(raw, model.tokenizer, model.n_ctx, model.vocab_size)
    short = [p.id for p in out if len(p) < tokens]
    if short:
        raise SystemExit(f"{domain}: prompts shorter than {tokens} tokens: {short}")
    return [TokenizedPrompt(p.id, p.ids[:tokens], p.meta) for p in out]


def screen(model, prompts: dict[str, list[TokenizedPrompt]], k: int) -> list[tuple[int, int]]:
    """The ``k`` heads whose first-token attention differs most between domains (max - min): the
    observational proxy picks the heads worth one redirected forward per domain."""
    attention = []
    for domain, ps in prompts.items():
        probe = FirstTokenAttention()
        run_pattern_probes(model, ps, [probe], RunContext(batch_size=len(ps), progress=False))
        attention.append(probe.total["sum"].cpu() / sum(len(p) - 1 for p in ps))
    spread = torch.stack(attention).amax(0) - torch.stack(attention).amin(0)
    order = spread.flatten().argsort(descending=True)[:k].tolist()
    return sorted((i // model.n_heads, i % model.n_heads) for i in order)


def run_model(name: str, args: argparse.Namespace) -> tuple[pd.DataFrame, dict]:
    model = load_model(name)
    prompts = {domain: domain_prompts(model, domain, args.n_prompts, args.tokens) for domain in DOMAINS}
    params: dict = {"dormant_below": args.dormant_below}
    info: dict = {"n_layers": model.n_layers, "n_heads": model.n_heads, "domains": {}}
    if args.select:
        heads = screen(model, prompts, args.select)
        params["heads"] = ",".join(f"{layer}.{head}" for layer, head in heads)
        info["selected_by_attention_spread"] = params["heads"]
        print(f"{name}: redirecting {params['heads']}", flush=True)
    elif args.layers:
        params["layers"] = args.layers
    tables = []
    for domain, ps in prompts.items():
        start = time.time()
        result = run_probes(model, ps, [DormantProbe(**params)], batch_size=len(ps), progress=False)
        seconds = time.time() - start
        summary = result.results["dormant"].summary
        info["domains"][domain] = {
            "loss_base": summary["loss_base"],
            "n_tokens": summary["n_tokens"],
            "dormant_heads": summary["dormant_heads"],
            "n_heads_redirected": summary["n_heads_redirected"],
            "seconds": round(seconds, 1),
            "first_tokens": sorted({model.tokenizer.decode([p.ids[0]]) for p in ps}),
        }
        print(f"{name} {domain}: {result.lines()[0]} ({seconds:.0f} s)", flush=True)
        tables.append(tidy(result.table, name, domain))
    return pd.concat(tables, ignore_index=True), info


def run_control(name: str, args: argparse.Namespace, old: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """``--control K``: K heads drawn at random (seed 0) among those of ``name`` not yet redirected in
    ``old``, redirected on every domain; their ``dormancy_dloss`` rows are added to the model's rows
    (the first-token attention rows are already there). A check on what the screen left out."""
    import random

    model = load_model(name)
    done = old[(old.model == name) & (old.metric == DLOSS)]
    seen = set(zip(done.layer, done["head"]))
    every = [(layer, head) for layer in range(model.n_layers) for head in range(model.n_heads)]
    pool = [h for h in every if h not in seen]
    heads = sorted(random.Random(0).sample(pool, args.control))
    spec = ",".join(f"{layer}.{head}" for layer, head in heads)
    print(f"{name}: control heads {spec}", flush=True)
    tables, info = [], {"heads": spec, "domains": {}}
    for domain in DOMAINS:
        ps = domain_prompts(model, domain, args.n_prompts, args.tokens)
        start = time.time()
        probe = DormantProbe(heads=spec, dormant_below=args.dormant_below)
        result = run_probes(model, ps, [probe], batch_size=len(ps), progress=False)
        summary = result.results["dormant"].summary
        info["domains"][domain] = {"loss_base": summary["loss_base"], "dormant_heads": summary["dormant_heads"],
                                   "seconds": round(time.time() - start, 1)}
        print(f"{name} {domain}: {result.lines()[0]}", flush=True)
        table = tidy(result.table, name, domain)
        tables.append(table[table.metric == DLOSS])
    return pd.concat(tables, ignore_index=True), info


def top_effects(table: pd.DataFrame, k: int = 5) -> dict:
    """Per model and domain, the ``k`` redirected heads of largest |dloss|, with their attention."""
    out: dict = {}
    for (model, domain), t in table.groupby(["model", "dataset"]):
        d = t[t.metric == DLOSS].set_index(["layer", "head"])["value"]
        a = t[t.metric == FIRST].set_index(["layer", "head"])["value"]
        top = d.abs().sort_values(ascending=False).head(k)
        out.setdefault(model, {})[domain] = [
            {
                "head": f"{layer}.{head}",
                "dloss": round(float(d[layer, head]), 5),
                "first_token_attention": round(float(a[layer, head]), 4),
            }
            for (layer, head), v in top.items()
        ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", default=None, help="only these layers' heads, e.g. 0-5 (default: all)")
    ap.add_argument("--select", type=int, default=0, help="redirect only the K heads whose first-token attention "
                    "differs most between domains (0: every head, or --layers)")
    ap.add_argument("--dormant-below", type=float, default=0.005)
    ap.add_argument("--active-above", type=float, default=0.02)
    ap.add_argument("--control", type=int, default=0, help="add K randomly drawn heads not yet redirected to the "
                    "models already in the parquet (same prompts)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_parquet, out_json = HERE / "dormant.parquet", HERE / "dormant.json"
    old = pd.read_parquet(out_parquet) if out_parquet.is_file() else None
    summary = json.loads(out_json.read_text()) if out_json.is_file() else {"models": {}}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    tables = [] if old is None else [old[~old.model.isin(names)]]
    for name in names:
        start = time.time()
        if args.control:
            table, info = run_control(name, args, old)
            summary["models"][name]["control"] = {**info, "seconds": round(time.time() - start, 1)}
            tables.append(pd.concat([old[old.model == name], table], ignore_index=True))
        else:
            table, info = run_model(name, args)
            info["seconds"] = round(time.time() - start, 1)
            keys = ("n_prompts", "tokens", "layers", "select", "dormant_below")
            info["settings"] = {k: getattr(args, k) for k in keys}
            summary["models"][name] = info
            tables.append(table)
        both = pd.concat(tables, ignore_index=True)
        both.to_parquet(out_parquet, index=False)
        found = active_dormant(both, args.dormant_below, args.active_above)
        summary["thresholds"] = {"dormant_below": args.dormant_below, "active_above": args.active_above}
        summary["active_dormant"] = found.round(5).to_dict(orient="records")
        summary["top_effects"] = top_effects(both)
        out_json.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        print(f"{name}: {time.time() - start:.0f} s; active-dormant rows so far:\n{found.to_string()}", flush=True)


if __name__ == "__main__":
    main()
