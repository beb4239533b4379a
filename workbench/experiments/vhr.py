"""Head reinforcement (VHR): pick the heads whose output depends most on the condition (image,
context passage), scale their output and see whether the model's answers change.

:func:`vhr_heads` picks the heads from a ``vhd`` / ``context`` probe table (in each chosen layer,
heads whose divergence is above the layer's median, as in the paper); :func:`reinforce` decodes
each item greedily without and with those heads scaled by ``alpha``
(:class:`workbench.engine.interventions.HeadScaling`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.inputs.batching import BatchSize

if TYPE_CHECKING:
    from workbench.models.loading import LoadedModel


def reinforce(
    model: LoadedModel,
    pairs: Sequence,
    heads: Sequence[tuple[int, int]],
    alpha: float = 2.0,
    positions: str = "first",
    max_new_tokens: int = 16,
    batch_size: BatchSize = "auto",
) -> tuple[pd.DataFrame, list[dict]]:
    """Greedy answers to each item (with its condition) without and with ``heads`` scaled by
    ``alpha`` (VHR): does reinforcing vision-aware heads change what the model says?

    Returns tidy rows (``metric = answer_changed``, ``layer = head = -1``, one per item, the
    reinforced answer in ``token``) and the answers themselves.
    """
    from workbench.engine.divergence import greedy_continuations
    from workbench.engine.interventions import HeadScaling
    from workbench.protocol.run_context import RunContext

    conds = [p.cond for p in pairs]
    ctx = RunContext(batch_size=batch_size)
    base = greedy_continuations(model, conds, max_new_tokens, ctx)
    scaled = greedy_continuations(model, conds, max_new_tokens, ctx, [HeadScaling(heads, alpha, positions)])
    tok = model.tokenizer
    answers, rows = [], []
    for p, a, b in zip(pairs, base, scaled):
        answers.append({"item": p.id, "baseline": tok.decode(a), "reinforced": tok.decode(b), "changed": a != b})
        rows.append(
            {
                "probe": "vhr",
                "metric": "answer_changed",
                "layer": -1,
                "head": -1,
                "value": float(a != b),
                "n": 1,
                "item": p.id,
                "step": 0,
                "token": tok.decode(b),
            }
        )
    return pd.DataFrame(rows), answers


def default_vhr_layers(n_layers: int) -> list[int]:
    """VHR's layers for LLaVA-1.5 (32 layers: layer 2 and the last 14), scaled to ``n_layers``."""
    n_last = max(1, round(n_layers * 14 / 32))
    return sorted({min(2, n_layers - 1), *range(n_layers - n_last, n_layers)})


def vhr_heads(
    table,
    layers: Sequence[int] | None = None,
    metric: str = "vhd",
    attention_metric: str = "image_attention",
    set_aside: bool = True,
) -> list[tuple[int, int]]:
    """The heads VHR reinforces, from a probe table with per-head ``vhd`` (and ``image_attention``).

    In each chosen layer: heads whose VHD is above the layer's median. With ``set_aside``,
    heads whose VHD *and* text attention (1 - image attention) are both above mean + std (over
    the chosen layers' heads) are left out, as in the paper.
    """
    import pandas as pd

    df = table[(table["metric"] == metric) & (table["layer"] >= 0)]
    if df.empty:
        raise WorkbenchError(
            f"the table has no per-head {metric!r} rows", "run the vhd (or context) probe first and pass its table"
        )
    n_layers = int(df["layer"].max()) + 1
    layers = list(layers) if layers is not None else default_vhr_layers(n_layers)
    df = df[df["layer"].isin(layers)].groupby(["layer", "head"], as_index=False)["value"].mean()
    att = table[(table["metric"] == attention_metric) & (table["layer"] >= 0)]
    if set_aside and not att.empty:
        att = att.groupby(["layer", "head"], as_index=False)["value"].mean().rename(columns={"value": "att"})
        df = df.merge(att, on=["layer", "head"], how="left")
        text = 1.0 - df["att"]
        aside = (df["value"] > df["value"].mean() + df["value"].std()) & (text > text.mean() + text.std())
    else:
        aside = pd.Series(False, index=df.index)
    med = df.groupby("layer")["value"].transform("median")
    keep = df[(df["value"] > med) & ~aside]
    return [(int(r.layer), int(r.head)) for r in keep.itertuples()]
