"""Distil ``workbench kv`` run folders into data/results/kv_grid.parquet and kv_grid.json.

The grids behind README's "KV-cache policies" findings and notebooks/10_kv_cache.ipynb. Each was
run with ``OMP_NUM_THREADS=1`` on the shared 2-core machine (commands in kv_grid.json, "runs");
this script reads their run folders and writes:

- ``kv_grid.parquet``: every grid row (model, policy, selector, budget, kv_tokens, kv_fraction,
  kv_bytes, head_sparsity, task, protocol, length, depth, metric, value, seed, n, item, response);
- ``kv_grid.json``: per model and protocol, the smallest kv_fraction at which each selector keeps
  >= 95% of full-cache niah accuracy; per budget, each head selector against the random heads
  (mean, std and range over seeds) on niah accuracy and delta loss; the rank correlation of
  DuoAttention's gates with the retrieval scores (Spearman over the eligible KV heads).

Usage: ``python data/results/build_kv_grid.py RUN_FOLDER [RUN_FOLDER ...]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from workbench.kv.grid import kv_scores
from workbench.kv.policy import CachePolicy, geometry
from workbench.report.kv import fraction_to_keep
from workbench.runs.load import load_results

HERE = Path(__file__).parent
HEAD_SELECTORS = ("retrieval", "streaming-heads", "razor", "duo")


def versus_random(t: pd.DataFrame) -> list[dict]:
    """Each head selector against the random heads at the same budget (same count of full heads)."""
    out = []
    for (model, protocol, metric), g in t[t.metric.isin(["accuracy", "delta_loss"])].groupby(
        ["model", "protocol", "metric"]
    ):
        rnd = g[g.selector == "random"].groupby(["budget", "seed"]).value.mean()
        for sel in HEAD_SELECTORS:
            s = g[g.selector == sel]
            for budget, v in s.groupby("budget").value.mean().items():
                draws = rnd.loc[budget] if budget in rnd.index.get_level_values(0) else pd.Series(dtype=float)
                better = (draws < v) if metric == "accuracy" else (draws > v)
                out.append(
                    {
                        "model": model, "protocol": protocol, "metric": metric, "selector": sel, "budget": budget,
                        "kv_fraction": float(s[s.budget == budget].kv_fraction.mean()), "value": float(v),
                        "random_mean": float(draws.mean()) if len(draws) else None,
                        "random_std": float(draws.std(ddof=1)) if len(draws) > 1 else None,
                        "random_min": float(draws.min()) if len(draws) else None,
                        "random_max": float(draws.max()) if len(draws) else None,
                        "random_seeds": int(len(draws)), "seeds_beaten": int(better.sum()),
                    }
                )  # fmt: skip
    return out


def duo_vs_retrieval(model_name: str) -> dict | None:
    """Spearman correlation of DuoAttention gates and retrieval scores over the eligible KV heads."""
    import workbench

    gates = HERE / f"kv_duo_{model_name}.parquet"
    if not gates.exists():
        return None
    model = workbench.load_model(model_name)
    geom = geometry(model)
    cross = pd.read_parquet(HERE / "cross_model.parquet")
    retr = cross[(cross.model == model_name) & (cross.probe == "retrieval")]
    g = pd.read_parquet(gates).rename(columns={"kv_head": "head", "gate": "value"}).assign(metric="gate")
    duo = kv_scores("duo", g, geom)[0]
    ret = kv_scores("retrieval", retr, geom)[0]
    heads = CachePolicy(geom).eligible
    a = [float(duo[h]) for h in heads]
    b = [float(ret[h]) for h in heads]
    rho = spearmanr(a, b)
    k = max(1, round(0.25 * len(heads)))
    top = lambda xs: {h for _, h in sorted(zip((-x for x in xs), heads))[:k]}  # noqa: E731
    return {
        "kv_heads": len(heads),
        "spearman": float(rho.statistic),
        "p_value": float(rho.pvalue),
        f"top_{k}_overlap": len(top(a) & top(b)),
    }


def main(folders: list[str]) -> None:
    table = pd.concat([load_results(f) for f in folders], ignore_index=True)
    # the same grid point on the same item in two runs (the full cache in every run, the question-aware
    # run's question-agnostic half) is the same computation: count it once
    key = ["model", "policy", "protocol", "task", "length", "depth", "item", "metric", "seed"]
    table = table.drop_duplicates(subset=key, keep="first").reset_index(drop=True)
    keep = [c for c in table.columns if c not in ("dataset", "probe", "layer", "head")]
    table[keep].to_parquet(HERE / "kv_grid.parquet", index=False)
    niah = table[table.task == "niah"]
    summary = {
        "runs": [json.loads((Path(f) / "command.json").read_text()) if (Path(f) / "command.json").exists() else f
                 for f in folders],  # fmt: skip
        "fraction_to_keep_95": fraction_to_keep(niah).to_dict(orient="records"),
        "versus_random": versus_random(table),
        "duo_vs_retrieval": {m: duo_vs_retrieval(m) for m in sorted(table.model.unique())},
        "kv_fraction_range": {
            m: {"min": float(g.kv_fraction.min()), "max": float(g.kv_fraction.max())} for m, g in table.groupby("model")
        },
    }
    (HERE / "kv_grid.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary["fraction_to_keep_95"], indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
