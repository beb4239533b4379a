"""A sweep's pattern views: the attention of the strongest head of each role, stored in the run folder.

The report is drawn from stored results only, so the rows a pattern view shows are computed by
the sweep, after its units finish, in the driver process whatever the executor:

1. **Which heads.** Per model and role, the strongest head (:func:`workbench.protocol.evidence.strongest_heads`:
   the head the role holds for with the most extreme value, on the dataset of that value; the
   atlas' top head of the role). A role no head holds gets no view.
2. **Which rows.** Item 0 of that dataset, built and tokenized as the sweep built it for the
   probes (same options, seed and ``prepend_bos``), and the query rows the dataset declares
   (:func:`workbench.datasets.pattern_rows`: by default the square of the first
   :data:`~workbench.datasets.view.MAX_SQUARE` rows; ``niah``: the decoding rows over the needle).
   Weights come from :func:`workbench.engine.rows.attention_rows` (only those heads and rows; the
   forward stops after the last layer needed). On a causal model keys stop at the last kept
   row (the rest are masked, weight 0); otherwise every key is kept.
3. **Storage.** ``OUT/views.parquet``, written atomically, tidy: one row per (model, role, query,
   key) with :data:`COLUMNS`. ``run.json`` records under ``views`` what it was built from (a
   digest of every part's name and checksum and the roles' rules, :func:`source_digest`) and the file's checksum: a
   re-run rebuilds it when a part changed and skips it, without loading any model, when it is
   fresh. ``views = false`` in the sweep config sets an existing file aside
   (``superseded/<time>/views-off/``) and builds none.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.files import targets
from workbench.runs.config import DatasetSpec, SweepConfig
from workbench.runs.folder import RunFolder

FILE = "views.parquet"
FORMAT = 1  # bump when what a view holds changes: every run folder's views are then rebuilt
COLUMNS = [
    "model",  # the model as the sweep names it
    "role",  # the role the head is the strongest of
    "metric",  # the role's metric
    "value",  # the head's evidence: its value of the metric on ``dataset``
    "layer",
    "head",
    "dataset",  # the sweep's dataset table the value was measured on
    "item",  # the prompt's id (item 0 of the dataset)
    "view",  # "square" (query x key) or "strip" (one line per query row over every key)
    "query",  # the query row's position in the tokens run
    "key",  # the key's position
    "weight",  # float32 attention weight of ``query`` on ``key``
    "query_token",  # the tokens' text
    "key_token",
    "mark",  # a label for keys in a span the dataset marks (niah: "needle", counterfact: "passage"), else ""
]


def source_digest(folder: RunFolder) -> str:
    """What the views are built from: every part's name and checksum, the roles' rules (a probe
    that changes a threshold changes which head is strongest) and :data:`FORMAT`."""
    from workbench.protocol.evidence import probe_roles

    parts = sorted((name, str(e.get("sha256"))) for name, e in folder.manifest["parts"].items())
    roles = [[r.name, r.metric, r.threshold, r.sign, r.strict] for r in probe_roles()]
    blob = json.dumps({"format": FORMAT, "parts": parts, "roles": roles})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_fresh(folder: RunFolder, digest: str) -> bool:
    """``views.parquet`` is there, as recorded, and was built from these parts."""
    entry = folder.manifest.get("views")
    path = targets.join(folder.out, FILE)
    if not isinstance(entry, dict) or entry.get("built_from") != digest or not targets.is_file(path):
        return False
    return targets.size(path) == entry.get("size") and targets.sha256(path) == entry.get("sha256")


def item_zero(cfg: SweepConfig, spec: DatasetSpec, model: Any) -> tuple[Any, Any]:
    """Item 0 of a dataset table as built (a :class:`workbench.inputs.prompts.Prompt`) and as the
    probes saw it: built as the sweep builds it and tokenized with the sweep's ``prepend_bos``
    (a :class:`workbench.inputs.prompts.TokenizedPrompt`)."""
    from workbench.inputs.prompts import tokenize_prompts
    from workbench.runs.group import group_prompts

    first = group_prompts(cfg, spec, model)[:1]
    tokenized = tokenize_prompts(first, model.tokenizer, model.n_ctx, model.vocab_size, prepend_bos=cfg.prepend_bos)
    return first[0], tokenized[0]


def _tidy(chosen: Any, item: str, rows: Any, w: np.ndarray, tokens: list[str]) -> pd.DataFrame:
    """One view's rows: ``w`` is ``[query, key]`` for ``rows.queries`` over the first ``len(tokens)`` keys."""
    n_q, n_k = w.shape
    keys = np.arange(n_k)
    mark = np.full(n_k, "", dtype=object)
    if rows.mark is not None:
        mark[max(0, rows.mark[0]) : rows.mark[1]] = rows.mark_label
    qs = np.asarray(rows.queries)
    texts = np.asarray(tokens, dtype=object)
    return pd.DataFrame(
        {
            "model": chosen.model,
            "role": chosen.role,
            "metric": chosen.metric,
            "value": float(chosen.value),
            "layer": int(chosen.layer),
            "head": int(chosen.head),
            "dataset": chosen.dataset,
            "item": item,
            "view": rows.view,
            "query": np.repeat(qs, n_k).astype("int64"),
            "key": np.tile(keys, n_q).astype("int64"),
            "weight": w.astype(np.float32).reshape(-1),
            "query_token": np.repeat(texts[qs], n_k),
            "key_token": np.tile(texts, n_q),
            "mark": np.tile(mark, n_q),
        }
    )


def dataset_views(cfg: SweepConfig, model: Any, dataset: str, chosen: pd.DataFrame) -> list[pd.DataFrame]:
    """The views of the heads ``chosen`` (rows of :func:`strongest_heads` on ``dataset``) on
    item 0 of ``dataset``: one forward for all of them."""
    from workbench.datasets import pattern_rows
    from workbench.engine.rows import attention_rows

    spec = cfg.datasets[dataset]
    raw, prompt = item_zero(cfg, spec, model)
    rows = pattern_rows(spec.generator, prompt.ids, prompt.meta, raw.text, model.tokenizer)
    heads = list(dict.fromkeys((int(r.layer), int(r.head)) for r in chosen.itertuples(index=False)))
    weights = attention_rows(model, rows.ids, heads, rows.queries)
    n_keys = max(rows.queries) + 1 if model.is_causal else len(rows.ids)  # later keys are masked: weight 0
    tokens = [model.tokenizer.decode([int(t)]) for t in rows.ids[:n_keys]]
    return [
        _tidy(r, prompt.id, rows, weights[(int(r.layer), int(r.head))][:, :n_keys].numpy(), tokens)
        for r in chosen.itertuples(index=False)
    ]


def compute_views(cfg: SweepConfig, chosen: pd.DataFrame, load: Callable[[str], Any]) -> pd.DataFrame:
    """Every view of ``chosen`` (:func:`strongest_heads` rows), one model load per model."""
    frames: list[pd.DataFrame] = []
    for name in dict.fromkeys(chosen["model"]):
        model = load(name)
        mine = chosen[chosen["model"] == name]
        for dataset in dict.fromkeys(mine["dataset"]):
            frames += dataset_views(cfg, model, dataset, mine[mine["dataset"] == dataset])
    if not frames:
        return empty_views()
    return pd.concat(frames, ignore_index=True)[COLUMNS]


def empty_views() -> pd.DataFrame:
    ints, floats = ("layer", "head", "query", "key"), ("value",)
    return pd.DataFrame(
        {
            c: pd.Series(
                dtype="int64" if c in ints else "float64" if c in floats else "float32" if c == "weight" else object
            )
            for c in COLUMNS
        }
    )


def choose(cfg: SweepConfig, table: pd.DataFrame) -> pd.DataFrame:
    """The strongest head of each role per model of the sweep, on a dataset table of the sweep."""
    from workbench.protocol.evidence import strongest_heads

    chosen = strongest_heads(table)
    keep = chosen["model"].isin(cfg.models) & chosen["dataset"].isin(list(cfg.datasets))
    return chosen[keep].reset_index(drop=True)


def _set_aside(folder: RunFolder, log: Callable[[str], None]) -> None:
    path = targets.join(folder.out, FILE)
    folder.manifest.pop("views", None)
    if targets.is_file(path):
        dest = folder.set_aside(path, "views-off")
        log(f"views = false: set the earlier {FILE} aside in {dest}")
    folder.save()


def update_views(
    cfg: SweepConfig,
    folder: RunFolder,
    log: Callable[[str], None] = print,
    loaded: tuple[str, Any] | None = None,
) -> str:
    """Build ``OUT/views.parquet`` unless it is fresh; returns what happened: ``"built"``,
    ``"fresh"`` (nothing loaded), ``"off"`` (``views = false``) or ``"none"`` (no parts).
    ``loaded``: the ``(name, model)`` an in-process executor ran last, used instead of loading
    that model again; others load as the local executor loads them."""
    from workbench.runs.load import load_results
    from workbench.runs.parquet import run_metadata, write_parquet

    if not cfg.views:
        _set_aside(folder, log)
        return "off"
    if not folder.manifest["parts"]:
        return "none"
    digest = source_digest(folder)
    if is_fresh(folder, digest):
        return "fresh"

    def load(name: str) -> Any:
        if loaded is not None and loaded[0] == name:
            return loaded[1]
        from workbench.models.loading import load_model

        return load_model(name, device=cfg.device, dtype=cfg.dtype)

    chosen = choose(cfg, load_results(folder.out))
    log(f"views: the attention of the strongest head of {len(chosen)} role(s) on {chosen['model'].nunique()} model(s)")
    frame = compute_views(cfg, chosen, load)
    path = targets.join(folder.out, FILE)
    write_parquet(frame, path, run_metadata(views={"format": FORMAT, "built_from": digest}))
    folder.manifest["views"] = {"built_from": digest, "size": targets.size(path), "sha256": targets.sha256(path)}
    folder.save()
    log(f"views -> {path} ({targets.size(path) / 1e3:.0f} KB)")
    return "built"


def read_views(run_dir: str | Any) -> pd.DataFrame | None:
    """The views of a run folder (a path or an fsspec URL), or None when it has none (an older
    run, ``views = false``, a results file); an unreadable file is a :class:`WorkbenchError`."""
    from workbench.runs.parquet import read_parquet

    run_dir = targets.as_target(run_dir)
    if not targets.is_dir(run_dir):
        return None
    path = targets.join(run_dir, FILE)
    if not targets.is_file(path):
        return None
    frame, _ = read_parquet(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise WorkbenchError(
            f"{path} lacks the columns {missing} (written by another workbench version)",
            "re-run the sweep into its folder to rebuild the views",
        )
    return frame


__all__ = ["COLUMNS", "FILE", "compute_views", "read_views", "source_digest", "update_views"]
