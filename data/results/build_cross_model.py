"""Distil the cross-model sweep into data/results/cross_model.parquet (read by notebooks/06_cross_model.ipynb).

    workbench sweep data/sweeps/cross_model.toml --out runs/cross
    workbench task ioi --model M --n-prompts 8 --out runs/ioi/M.jsonl                          # per model
    workbench patch path --model M --pairs runs/ioi/M.jsonl --out runs/ioi/M__path.parquet     # per model
    python data/results/build_cross_model.py --bos-prompts runs/bos   # Gemma's BOS experiment (optional):
    workbench probe sink --model gemma3-270m --prompts runs/bos/bos-prose.jsonl \\
        --out runs/bos/gemma3-270m__bos-prose.parquet
    workbench probe sink --model gemma3-270m --prompts runs/bos/no-bos-prose.jsonl \\
        --out runs/bos/gemma3-270m__no-bos-prose.parquet
    workbench dataset niah --model gemma3-270m --context-len 8000 --depths 0,0.5,1 --n-prompts 3 \\
        --out runs/niah-long/niah-8k.jsonl
    # Gemma beyond the sweep's 4k (at 16k: --context-len 16000 --depths 0.5 --n-prompts 1):
    workbench probe retrieval --model gemma3-270m --prompts runs/niah-long/niah-8k.jsonl \\
        --param retrieval.max_new_tokens=20 --out runs/niah-long/gemma3-270m__niah-8k.parquet
    python data/results/build_cross_model.py runs/cross --ioi runs/ioi --extra runs/bos --extra runs/niah-long

The BOS experiment: the ``prose`` dataset's first 8 passages (seed 0) as Gemma token ids, once as its tokenizer
gives them (BOS first) and once without the BOS, so the sink probe's "first token" is BOS or the first word.

One long table, one row per value:

- ``kind = "head"``: every per-head row of the run (``layer``, ``head`` >= 0), plus the path-patching
  effects on IOI (``dataset = "ioi"``, ``probe = "path_patching"``) and the parts of ``workbench probe`` runs in
  ``--extra`` folders (``dataset`` = the prompts file's name: ``bos-prose`` / ``no-bos-prose``, ``niah-8k``);
- ``kind = "summary"``: per unit numbers with ``layer = head = -1``: the retrieval probe's ``accuracy``,
  ``n_counted`` and ``share_above_0.1`` per niah length, and IOI's ``ld_clean`` / ``ld_corrupted``
  (mean logit differences over the pairs) with ``n`` = pairs.

Columns added to every row: ``n_layers``, ``n_heads``, ``depth`` = layer / (n_layers - 1) (the report's
relative depth; NaN on summary rows), ``attention`` = ``"global"`` or ``"sliding"`` (the layer's kind from the
model config's ``layer_types``; every layer is global in a model without a sliding window).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

COLUMNS = [
    "kind",
    "model",
    "dataset",
    "probe",
    "metric",
    "layer",
    "head",
    "value",
    "n",
    "n_layers",
    "n_heads",
    "depth",
    "attention",
]
SUMMARY_KEYS = ["accuracy", "n_counted", "share_above_0.1"]


def _meta(path: Path) -> dict:
    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(b"workbench", b"{}"))


def _layer_types(model_meta: dict) -> list[str] | None:
    """``layer_types`` from the config of the folder the model was loaded from (None: all global)."""
    source = model_meta.get("source")
    cfg_path = Path(source) / "config.json" if source else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    if not cfg.get("sliding_window"):
        return None
    return cfg.get("layer_types")


def _part_rows(path: Path, models: dict) -> list[pd.DataFrame]:
    meta = _meta(path)
    table = pd.read_parquet(path)
    m = meta["model"]
    models.setdefault(m["model"], {"n_layers": m["n_layers"], "n_heads": m["n_heads"], "layer_types": _layer_types(m)})
    heads = table[(table.layer >= 0) & (table["head"] >= 0)]
    keep = [c for c in ["model", "dataset", "probe", "metric", "layer", "head", "value", "n"] if c in heads]
    heads = heads.assign(dataset=heads.dataset.str.removesuffix(".jsonl"))  # `--prompts bos-prose.jsonl` -> bos-prose
    out = [heads[keep].assign(kind="head")]
    # a sweep part has one probe's "summary"; `workbench probe` writes "summaries" by probe
    summaries = meta.get("summaries") or {p["name"]: meta.get("summary") or {} for p in meta.get("probes", [])}
    rows = [
        {
            "kind": "summary",
            "model": m["model"],
            "dataset": meta["dataset"]["name"].removesuffix(".jsonl"),
            "probe": probe,
            "metric": k,
            "layer": -1,
            "head": -1,
            "value": float(summary[k]),
            "n": summary.get("n_prompts"),
        }
        for probe, summary in summaries.items()
        for k in SUMMARY_KEYS
        if k in summary
    ]
    if rows:
        out.append(pd.DataFrame(rows))
    return out


def _ioi_rows(folder: Path, models: dict) -> list[pd.DataFrame]:
    """``*__path.parquet`` from ``workbench patch path`` (one per model): effects per head and the mean
    clean / corrupted logit differences (from the file's metadata)."""
    out = []
    for path in sorted(folder.glob("*__path.parquet")):
        meta = _meta(path)
        table = pd.read_parquet(path)
        model = meta.get("model", {}).get("model") or path.name.split("__")[0]
        m = meta.get("model", {})
        if model not in models and m:
            models[model] = {"n_layers": m["n_layers"], "n_heads": m["n_heads"], "layer_types": _layer_types(m)}
        heads = table[(table.layer >= 0) & (table["head"] >= 0)]
        out.append(
            pd.DataFrame(
                {
                    "kind": "head",
                    "model": model,
                    "dataset": "ioi",
                    "probe": "path_patching",
                    "metric": heads.metric,
                    "layer": heads.layer,
                    "head": heads["head"],
                    "value": heads.value,
                    "n": heads.n,
                }
            )
        )
        ds = meta.get("dataset") or {}
        rows = [
            {
                "kind": "summary",
                "model": model,
                "dataset": "ioi",
                "probe": "path_patching",
                "metric": k,
                "layer": -1,
                "head": -1,
                "value": float(ds[k]),
                "n": ds.get("n_pairs"),
            }
            for k in ("ld_clean", "ld_corrupted")
            if k in ds
        ]
        if rows:
            out.append(pd.DataFrame(rows))
    return out


def build(run: Path, ioi: Path | None = None, extra: list[Path] | None = None) -> pd.DataFrame:
    models: dict = {}
    frames = [f for p in sorted((run / "parts").glob("*.parquet")) for f in _part_rows(p, models)]
    for folder in extra or []:
        frames += [f for p in sorted(folder.glob("*.parquet")) for f in _part_rows(p, models)]
    if ioi is not None:
        frames += _ioi_rows(ioi, models)
    t = pd.concat(frames, ignore_index=True)
    t["n_layers"] = t.model.map(lambda m: models[m]["n_layers"]).astype("int64")
    t["n_heads"] = t.model.map(lambda m: models[m]["n_heads"]).astype("int64")
    t["depth"] = np.where(t.layer >= 0, t.layer / (t.n_layers - 1), np.nan)

    def kind(row) -> str | None:
        if row.layer < 0:
            return None
        types = models[row.model]["layer_types"]
        return "sliding" if types and types[row.layer] == "sliding_attention" else "global"

    t["attention"] = t.apply(kind, axis=1)
    t["layer"] = t.layer.astype("int64")
    t["head"] = t["head"].astype("int64")
    t["n"] = pd.to_numeric(t.n, errors="coerce").astype("float64")
    t["value"] = t.value.astype("float64")
    return t[COLUMNS].sort_values(["kind", "model", "dataset", "metric", "layer", "head"], ignore_index=True)


def write_bos_prompts(folder: Path, model: str = "gemma3-270m", n_prompts: int = 8) -> None:
    """bos-prose.jsonl and no-bos-prose.jsonl: the same prose passages as token ids with and without BOS."""
    from transformers import AutoTokenizer

    from workbench.datasets import make_dataset
    from workbench.models.embedded import embedded_folder

    tok = AutoTokenizer.from_pretrained(embedded_folder(model))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "bos-prose.jsonl", "w") as with_bos, open(folder / "no-bos-prose.jsonl", "w") as without:
        for p in make_dataset("prose", n_prompts=n_prompts, seed=0):
            ids = tok(p.text)["input_ids"]
            if ids[0] != tok.bos_token_id:
                raise SystemExit(f"{model}'s tokenizer does not prepend BOS")
            with_bos.write(json.dumps({"id": p.id, "tokens": ids}) + "\n")
            without.write(json.dumps({"id": p.id, "tokens": ids[1:]}) + "\n")
    print(f"{n_prompts} passages -> {folder}/bos-prose.jsonl, no-bos-prose.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="the sweep's output folder (runs/cross)")
    ap.add_argument(
        "--bos-prompts", type=Path, help="only write the BOS experiment's two prompt files into this folder"
    )
    ap.add_argument("--ioi", type=Path, help="folder with <model>__path.parquet from `workbench patch path`")
    ap.add_argument(
        "--extra", type=Path, action="append", help="folder of `workbench probe` outputs to add (repeatable)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("cross_model.parquet"))
    args = ap.parse_args()
    if args.bos_prompts:
        return write_bos_prompts(args.bos_prompts)
    if args.run is None:
        ap.error("give the sweep's output folder")
    t = build(args.run, args.ioi, args.extra)
    t.to_parquet(args.out, index=False, compression="zstd")
    print(f"{len(t)} rows, {t.model.nunique()} models -> {args.out}")


if __name__ == "__main__":
    main()
