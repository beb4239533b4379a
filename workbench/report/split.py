"""Rows that get a report section of their own (KV-cache grids, head gates) taken out of the
probe view, with plain column types.

A run's table mixes probe rows with rows of other kinds (``workbench kv``'s grid, ``workbench
gate``'s fits) whose columns the probe sections, the atlas and the top-heads table must not read.
Each such section says which rows are its own (a mask) and which columns it needs;
:func:`split_rows` takes them out, refusing rows written without those columns, and
:func:`plain_types` gives the columns plain types (floats with NaN, strings with "").
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from workbench.errors import WorkbenchError


def plain_types(frame: pd.DataFrame, numeric: Sequence[str], text: Sequence[str]) -> pd.DataFrame:
    """``frame`` with its ``numeric`` columns as floats (NaN where missing) and its ``text``
    columns as strings ("" where missing); other columns as they are."""
    out = frame.reset_index(drop=True).copy()
    for c in numeric:
        if c in out.columns:
            out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    for c in text:
        if c in out.columns:
            out[c] = out[c].astype("string").fillna("").astype(str)
    return out


def split_rows(
    table: pd.DataFrame,
    mask: pd.Series,
    required: Sequence[str],
    numeric: Sequence[str],
    text: Sequence[str],
    what: str,
    command: str,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(the rows of mask with plain types, every other row)``. Rows of ``what`` that lack a
    ``required`` column are a WorkbenchError naming ``command`` to re-run; with none, the first
    frame is empty, with the ``required``, ``text`` and ``numeric`` columns."""
    rows, rest = table[mask], table[~mask].reset_index(drop=True)
    if rows.empty:
        columns = list(dict.fromkeys([*required, *text, *numeric]))
        return plain_types(pd.DataFrame(columns=columns), numeric, text), rest
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise WorkbenchError(
            f"{what} lack the column(s) {', '.join(missing)}",
            f"re-run `{command}` with this version into a new folder",
        )
    return plain_types(rows, numeric, text), rest
