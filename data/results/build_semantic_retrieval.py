"""Findings for probe ``semantic_retrieval`` (CompressKV) on SmolLM2-135M, compared with ``retrieval``.

    .venv/bin/python data/results/build_semantic_retrieval.py

Both probes decode the same niah prompts (context 1024 and 2048 tokens x 5 needle depths, seed 0,
greedy, 50 tokens at most, prompts counted when ROUGE-1 recall > 0.5). Writes
``data/results/semantic_retrieval_smollm2-135m.parquet`` (both probes' rows) and
``data/results/semantic_retrieval_smollm2-135m.json`` (the numbers printed): counted prompts, top
heads of each score, Spearman rank correlation of the two scores over all heads, top-k overlaps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

import workbench
from probes.retrieval import RetrievalProbe
from probes.semantic_retrieval import SemanticRetrievalProbe
from workbench.datasets import make_dataset

OUT = Path(__file__).parent


def _top(table: pd.DataFrame, k: int) -> list[str]:
    sub = table.sort_values("value", ascending=False).head(k)
    return [f"{r.layer}.{r.head} ({r.value:.3f})" for r in sub.itertuples()]


def main() -> None:
    model = workbench.load_model("smollm2-135m", device="cpu")
    prompts = make_dataset(
        "niah", tokenizer=model.tokenizer, context_len=[1024, 2048], depths=[0.1, 0.3, 0.5, 0.7, 0.9], seed=0
    )
    wu, srh = RetrievalProbe(), SemanticRetrievalProbe()
    run = workbench.run_probes(model, prompts, [wu, srh], batch_size=5)
    table = run.table
    table.to_parquet(OUT / "semantic_retrieval_smollm2-135m.parquet")
    a = table[table.metric == "retrieval"].sort_values(["layer", "head"]).reset_index(drop=True)
    b = table[table.metric == "semantic_retrieval"].sort_values(["layer", "head"]).reset_index(drop=True)
    rho = spearmanr(a.value, b.value)
    key = a["layer"].astype(str) + "." + a["head"].astype(str)
    overlap = {}
    for k in (5, 10, 20):
        ta = set(key[a.value.rank(ascending=False, method="first") <= k])
        tb = set(key[b.value.rank(ascending=False, method="first") <= k])
        overlap[f"top{k}"] = len(ta & tb)
    facts = {
        "model": "smollm2-135m",
        "prompts": "niah, context_len 1024/2048 x depths 0.1..0.9 (10 prompts, seed 0)",
        "n_counted": int(b.n.iloc[0]),
        "responses": {o.prompt_id: o.response for o in srh.outcomes},
        "recall": {o.prompt_id: o.recall for o in srh.outcomes},
        "semantic_retrieval_top10": _top(b, 10),
        "retrieval_top10": _top(a, 10),
        "semantic_retrieval_max": float(b.value.max()),
        "semantic_retrieval_mean": float(b.value.mean()),
        "retrieval_share_above_0.1": float((a.value > 0.1).mean()),
        "spearman_all_heads": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "top_k_overlap": overlap,
    }
    (OUT / "semantic_retrieval_smollm2-135m.json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main()
