"""Build data/results/gate.{parquet,json} from ``workbench gate`` run folders (issue 33's findings).

    python data/results/build_gate.py RUN_DIR [RUN_DIR ...]

Each run folder holds one model and one task (``workbench gate --out RUN_DIR``). The parquet is
every row of every run except the per-initialisation gates (kept: ``gate_mean``, roles, losses,
checks, direct effects); the json summarises per (model, task): the role counts, the closing check
(baseline NLL, delta NLL per closed set, random heads mean +- std), and on IOI the agreement with
path patching plus the heads where the two disagree, and across tasks the heads facilitating on
both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from workbench.runs.load import load_results  # noqa: E402

COMMANDS = {  # the reduced protocol run for the findings (2 shared CPU cores), one process per command
    "ioi": "OMP_NUM_THREADS=1 workbench gate --model {model} --task ioi --n 64 --inits 2 --batch-size 8 "
    "--updates 100 --reg-updates 100 --out {out}",
    "niah": "OMP_NUM_THREADS=1 workbench gate --model {model} --task niah --context-len 128 --n 32 --inits 2 "
    "--batch-size 4 --updates 60 --reg-updates 60 --out {out}",
}


def _closing(t: pd.DataFrame) -> dict:
    c = t[t.metric == "check_delta_nll"]
    base = t[(t.metric == "check_nll") & (t.closed == "none")].value
    out = {"baseline_nll": float(base.iloc[0]) if len(base) else None}
    for (closed, k), g in c.groupby(["closed", "n_closed"]):
        if closed == "none":
            continue
        key = f"{closed}_{int(k)}" if closed.endswith("_top") else closed
        out[key] = {
            "n_closed": int(g.n_closed.iloc[0]),
            "delta_nll": float(g.value.mean()),
            "std": float(g.value.std(ddof=1)) if len(g) > 1 else None,
            "min": float(g.value.min()),
            "max": float(g.value.max()),
            "draws": int(len(g)),
        }
    return out


def _disagreement(t: pd.DataFrame, top_k: int) -> dict:
    d = t[t.metric == "direct_effect"].set_index(["layer", "head"]).value
    roles = t[t.metric == "role_agreement"].set_index(["layer", "head"]).role
    neg = t[(t.metric == "gate_mean") & (t.stage == "negative")].set_index(["layer", "head"]).value
    top = d.abs().sort_values(ascending=False).head(top_k)
    name = lambda k: f"{k[0]}.{k[1]}"  # noqa: E731
    return {
        "top_patching_heads": [
            {"head": name(k), "direct_effect": float(d[k]), "role": roles[k], "g_neg": float(neg[k])} for k in top.index
        ],
        "patching_top_not_facilitating": [name(k) for k in top.index if roles[k] != "facilitating"],
        "facilitating_outside_patching_top": len(
            [k for k in roles[roles == "facilitating"].index if k not in top.index]
        ),
    }


def summarise(t: pd.DataFrame) -> dict:
    roles = t[t.metric == "role_agreement"]
    out = {
        "n_examples": int(t.n.iloc[0]),
        "roles": roles.role.value_counts().to_dict(),
        "mean_role_agreement": float(roles.value.mean()) if len(roles) else None,
        "final_nll": {r.stage: float(r.value) for r in t[t.metric == "final_nll"].itertuples()},
        "closing": _closing(t),
        "facilitating_heads": [f"{r.layer}.{r.head}" for r in roles[roles.role == "facilitating"].itertuples()],
    }
    agree = t[t.metric.str.startswith("agree_")]
    if len(agree):
        top_k = int(agree.n_closed.iloc[0])
        out["patching"] = {r.metric: float(r.value) for r in agree.itertuples()} | {"top_k": top_k}
        out["patching"].update(_disagreement(t, top_k))
    return out


def main(dirs: list[str]) -> None:
    frames, summary, commands = [], {}, {}
    for d in dirs:
        t = load_results(d)
        model, task = t.model.iloc[0], t.dataset.iloc[0]
        frames.append(t[t.metric != "gate"])
        summary.setdefault(model, {})[task] = summarise(t)
        commands[f"{model}/{task}"] = COMMANDS.get(task, "").format(model=model, out=Path(d).name)
    for model, tasks in summary.items():
        if {"ioi", "niah"} <= set(tasks):
            a, b = set(tasks["ioi"]["facilitating_heads"]), set(tasks["niah"]["facilitating_heads"])
            tasks["facilitating_on_both"] = {"n": len(a & b), "ioi_only": len(a - b), "niah_only": len(b - a)}
    table = pd.concat(frames, ignore_index=True)
    for col in ("stage", "role", "closed"):
        table[col] = table[col].astype(str)
    table.to_parquet(HERE / "gate.parquet", index=False)
    (HERE / "gate.json").write_text(json.dumps({"summary": summary, "runs": commands}, indent=1, default=float))
    print(json.dumps(summary, indent=1, default=float)[:6000])
    print(np.unique(table.metric))


if __name__ == "__main__":
    main(sys.argv[1:])
