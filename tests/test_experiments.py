"""The retrieval-ablation experiment's bookkeeping, on a tiny model (the real run is in the README)."""

from __future__ import annotations

from tests.test_retrieval import copy_prompts
from workbench.experiments.retrieval_heads import retrieval_ablation


def test_retrieval_ablation_conditions(tiny_models):
    model = tiny_models["llama"]
    detect, evaluate = copy_prompts(model, [20, 15], seed=1), copy_prompts(model, [18, 12], seed=2)
    scores, table = retrieval_ablation(
        model, detect, evaluate, ks=(2, 3), draws=2, max_new_tokens=3, log=lambda *_: None
    )
    assert list(table.condition) == ["none", "top", "random", "random", "top", "random", "random"]
    assert all(len(h.split(",")) == k for h, k in zip(table.heads, table.k) if k)
    top3 = table[(table.condition == "top") & (table.k == 3)].heads.iloc[0].split(",")
    ranked = scores.sort_values("value", ascending=False)
    best = f"{int(ranked.layer.iloc[0])}.{int(ranked['head'].iloc[0])}"
    assert best in top3 or scores.value.isna().all()
    for r in table[table.condition == "random"].itertuples():
        assert not set(r.heads.split(",")) & set(top3 if r.k == 3 else top3[:2])
    assert ((table.value >= 0) & (table.value <= 1)).all() and (table.n == 2).all()


def test_retrieval_ablation_cli_writes_both_tables(tmp_path, capsys):
    from workbench.cli import main
    from workbench.runs.parquet import read_parquet

    out = tmp_path / "ra.parquet"
    assert (
        main(
            [
                "retrieval-ablation",
                "--model",
                "tiny-llama",
                "--n-prompts",
                "2",
                "--context-len",
                "100",
                "--k",
                "2",
                "--draws",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    acc, _ = read_parquet(out)
    scores, _ = read_parquet(tmp_path / "ra.scores.parquet")
    assert set(acc.condition) == {"none", "top", "random"} and len(scores) == 3 * 4
    assert main(["retrieval-ablation", "--model", "tiny-llama", "--k", "999", "--out", str(out)]) == 2
    assert "exceeds the model's 12 heads" in capsys.readouterr().err
