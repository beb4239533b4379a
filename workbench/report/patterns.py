"""Attention-pattern views of a few heads on one prompt: the look at a head after its score.

Two figures, both plain plotly (the report inlines plotly's JS once; a saved figure needs no
network), drawn from the rows :func:`workbench.engine.rows.attention_rows` keeps (only the
requested heads and query rows, never a layer's whole pattern):

- :func:`pattern_figure`: the query x key heatmap of each head side by side, token labels on
  both axes, hover naming the query token, the key token and the weight. The induction stripe
  one below the diagonal, a sink's first-token column, a previous-token head's sub-diagonal
  read off it directly.
- :func:`token_strip_figure`: CircuitsVis' "tokens" view for long prompts: one line per chosen
  (head, query row), every key token of the prompt coloured by the weight the query puts on it,
  so a retrieval head's decoding row lights up on the needle among 8k tokens.

Both carry a log / linear colour switch (plotly ``updatemenus``): weights span orders of
magnitude and a linear scale shows only the largest. Zero weights (masked keys) are blank on the
log scale. :func:`attention_pattern` runs the model and picks the square for short prompts (at
most ``max_square`` tokens) and the strip for long ones. Token labels carry their position
(``"3 ␣cat"``): plotly merges equal category labels, and repeated tokens are the point of an
induction view.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.datasets.view import MAX_SQUARE  # prompts up to this many tokens get the T x T square by default
from workbench.errors import WorkbenchError

COLORSCALE = "Viridis"
LOG_FLOOR = 1e-4  # the log scale's lowest colour; smaller nonzero weights take it
TEXT_CELLS = 4000  # token text is drawn inside strip cells only up to this many cells
TEXT_KEYS = 100  # and only up to this many keys a line (past it the cells are too narrow to read)
Head = tuple[int, int]


def token_label(text: str) -> str:
    """A token as a readable axis label: spaces and line breaks made visible, long ones cut."""
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return text if len(text) <= 12 else text[:11] + "…"


def position_labels(texts: Sequence[str]) -> list[str]:
    """Unique labels of a prompt's token texts, ``"position token"`` (``"3 ␣cat"``)."""
    return [f"{i} {token_label(str(t))}" for i, t in enumerate(texts)]


def token_labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """:func:`position_labels` of a prompt's token ids, decoded one by one."""
    return position_labels([tokenizer.decode([int(t)]) for t in ids])


def head_name(head: Head) -> str:
    return f"L{head[0]}.H{head[1]}"


def _as_array(w: Any) -> np.ndarray:
    return np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w, dtype=np.float64)


def _log_z(w: np.ndarray) -> np.ndarray:
    """log10 of the weights, floored at :data:`LOG_FLOOR`; exact zeros (masked keys) are NaN (blank)."""
    with np.errstate(divide="ignore"):
        return np.where(w > 0, np.log10(np.maximum(w, LOG_FLOOR)), np.nan)


def _switch(
    linear: list[np.ndarray], log: list[np.ndarray], hover_lin: str, hover_log: str, x: float = 1.0, pad: int = 28
) -> list[dict]:
    """The log / linear colour buttons, restyling every heatmap trace's z, range, colour bar and hover."""
    ticks = np.arange(np.log10(LOG_FLOOR), 1)
    lin = {"z": [np.round(z, 5) for z in linear], "zmin": 0.0, "zmax": 1.0, "hovertemplate": hover_lin}
    lin["colorbar.tickvals"], lin["colorbar.ticktext"] = [None], [None]
    lg = {"z": [np.round(z, 3) for z in log], "zmin": float(ticks[0]), "zmax": 0.0, "hovertemplate": hover_log}
    lg["colorbar.tickvals"], lg["colorbar.ticktext"] = [ticks.tolist()], [[f"{10**t:g}" for t in ticks]]
    buttons = [
        {"label": "linear", "method": "restyle", "args": [lin]},
        {"label": "log", "method": "restyle", "args": [lg]},
    ]
    # above the plot area and the panel titles; at its left (x=0) or right (x=1) end
    place = {"x": x, "y": 1.0, "xanchor": "left" if x < 0.5 else "right", "yanchor": "bottom", "pad": {"b": pad}}
    return [{"type": "buttons", "direction": "right", **place, "buttons": buttons}]


def _check_rows(rows: Mapping[Head, Any], tokens: Sequence[str], queries: Sequence[int] | None) -> list[int]:
    if not rows:
        raise WorkbenchError("no heads to draw", "give the rows of at least one head")
    shapes = {tuple(_as_array(w).shape) for w in rows.values()}
    if len(shapes) != 1:
        raise WorkbenchError(f"heads have rows of different shapes {sorted(shapes)}", "draw one prompt's rows")
    n_q, n_k = next(iter(shapes))
    if len(tokens) != n_k:
        raise WorkbenchError(f"{len(tokens)} token labels for {n_k} keys", "give one label per token of the prompt")
    qs = list(range(n_q)) if queries is None else [int(q) for q in queries]
    if len(qs) != n_q:
        raise WorkbenchError(f"{len(qs)} query positions for {n_q} rows", "give the query positions the rows hold")
    beyond = [q for q in qs if not 0 <= q < len(tokens)]
    if beyond:
        raise WorkbenchError(
            f"query position {beyond[0]} is beyond the {len(tokens)} token labels",
            "give query positions inside the prompt (0 .. number of tokens - 1)",
        )
    return qs


HOVER_LIN = "query %{y}<br>key %{x}<br>weight %{z:.4f}<extra>%{fullData.name}</extra>"
HOVER_LOG = "query %{y}<br>key %{x}<br>log10 weight %{z:.2f}<extra>%{fullData.name}</extra>"


def pattern_figure(
    rows: Mapping[Head, Any],
    tokens: Sequence[str],
    queries: Sequence[int] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Query x key heatmaps of ``rows`` (``{(layer, head): [query, key]}``, one prompt), one
    panel per head, ``tokens`` labelling the keys (and the query rows, at ``queries``; default:
    rows are positions 0..). Hover names both tokens and the weight; buttons switch log / linear."""
    qs = _check_rows(rows, tokens, queries)
    heads = list(rows)
    fig = make_subplots(rows=1, cols=len(heads), subplot_titles=[head_name(h) for h in heads], horizontal_spacing=0.12)
    linear = [_as_array(rows[h]) for h in heads]
    ylabels = [tokens[q] for q in qs]
    for i, (h, z) in enumerate(zip(heads, linear)):
        fig.add_trace(
            go.Heatmap(
                z=np.round(z, 5).astype(np.float32),  # float32: half the page's bytes
                x=list(tokens),
                y=ylabels,
                name=head_name(h),
                colorscale=COLORSCALE,
                zmin=0.0,
                zmax=1.0,
                coloraxis=None,
                showscale=i == len(heads) - 1,
                colorbar={"title": {"text": "weight", "side": "right"}},
                hovertemplate=HOVER_LIN,
            ),
            row=1,
            col=i + 1,
        )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-60)
    fig.update_yaxes(title_text="query", col=1)
    fig.update_xaxes(title_text="key")
    side = max(260, 12 * len(tokens))
    fig.update_layout(
        title=title or "attention pattern",
        updatemenus=_switch(linear, [_log_z(z) for z in linear], HOVER_LIN, HOVER_LOG),
        width=min(1800, 120 + side * len(heads)),
        height=min(1200, 180 + max(260, 12 * len(qs))),
        margin={"t": 110},
    )
    return fig


def token_strip_figure(
    rows: Mapping[Head, Any],
    tokens: Sequence[str],
    queries: Sequence[int],
    title: str | None = None,
) -> go.Figure:
    """CircuitsVis' "tokens" view: one line per (head, query row) of ``rows``, every key token
    coloured by that row's weight on it (token text drawn in the cells while there are at most
    :data:`TEXT_CELLS` of them and :data:`TEXT_KEYS` keys; hover names both tokens and the
    weight). For long prompts, where a ``T x T`` square would not fit."""
    qs = _check_rows(rows, tokens, queries)
    heads = list(rows)
    z = np.concatenate([_as_array(rows[h]) for h in heads], axis=0)
    ylabels = [f"{head_name(h)} q={tokens[q]}" for h in heads for q in qs]
    cells = [t.split(" ", 1)[-1] for t in tokens]  # the token without its position
    text = [cells] * len(ylabels) if z.size <= TEXT_CELLS and len(tokens) <= TEXT_KEYS else None
    fig = go.Figure(
        go.Heatmap(
            z=np.round(z, 5).astype(np.float32),  # float32: half the page's bytes
            x=list(tokens),
            y=ylabels,
            name="rows",
            text=text,
            texttemplate="%{text}" if text is not None else None,
            textfont={"size": 9},
            colorscale=COLORSCALE,
            zmin=0.0,
            zmax=1.0,
            colorbar={"title": {"text": "weight", "side": "right"}},
            hovertemplate=HOVER_LIN,
        )
    )
    fig.update_yaxes(autorange="reversed", type="category", title_text="head, query")
    fig.update_xaxes(type="category", title_text="key", showticklabels=len(tokens) <= 200, tickangle=-60)
    fig.update_layout(
        title=title or "attention over the prompt",
        # at the right end, as on the square: at the left they sat on the title's second line (the
        # strip has no fixed width, so the plot and its buttons follow the page's width)
        updatemenus=_switch([z], [_log_z(z)], HOVER_LIN, HOVER_LOG, x=1.0, pad=4),
        height=min(1400, 200 + 28 * len(ylabels)),
        margin={"t": 110, "l": 160},
    )
    return fig


def _prompt_ids(model: Any, prompt: str | Sequence[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise WorkbenchError("the prompt is empty (0 tokens)", "give some text or token ids")
        return list(model.tokenizer(prompt)["input_ids"])
    return [int(t) for t in prompt]


def attention_pattern(
    model: Any,
    prompt: str | Sequence[int],
    heads: Sequence[Head],
    queries: Sequence[int] | None = None,
    view: str = "auto",
    max_square: int = MAX_SQUARE,
    title: str | None = None,
) -> go.Figure:
    """The attention of ``heads`` (``[(layer, head), ...]``) on ``prompt`` (text, tokenized as the
    model's tokenizer does by default, or token ids), computed for those heads and query rows only.

    ``view="auto"``: the query x key square (:func:`pattern_figure`) when the prompt has at most
    ``max_square`` tokens (rows ``queries``, default every row), else the token strip
    (:func:`token_strip_figure`) of ``queries`` (default: the last row) over all keys;
    ``"square"`` / ``"strip"`` force one. Errors (:class:`WorkbenchError`): an empty prompt, a
    head out of range, a query row beyond the prompt."""
    from workbench.engine.rows import attention_rows

    if view not in ("auto", "square", "strip"):
        raise WorkbenchError(f"unknown view {view!r}", "choose auto, square or strip")
    ids = _prompt_ids(model, prompt)
    square = view == "square" or (view == "auto" and len(ids) <= max_square)
    if queries is None and not square:
        queries = [-1] if ids else None
    rows = attention_rows(model, ids, heads, queries)
    qs = list(range(len(ids))) if queries is None else [int(q) % len(ids) for q in queries]
    labels = token_labels(model.tokenizer, ids)
    name = f"{getattr(model, 'name', 'model')}: {', '.join(head_name(h) for h in rows)}"
    if square:
        return pattern_figure(rows, labels, qs, title=title or name)
    return token_strip_figure(rows, labels, qs, title=title or name)


__all__ = ["attention_pattern", "pattern_figure", "position_labels", "token_labels", "token_strip_figure"]
