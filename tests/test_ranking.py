"""The one head-ranking rule (workbench.protocol.ranking) and its users agree on ties and unscored heads."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from workbench.protocol.ranking import rank_heads


def test_best_first_ties_to_the_lower_head_unscored_last():
    scores = {(1, 0): 0.5, (0, 2): 0.9, (0, 1): 0.5, (2, 2): math.nan, (0, 0): 0.9}
    heads = [(2, 2), (1, 0), (0, 1), (0, 2), (0, 0), (3, 3)]  # (3, 3) has no score
    assert rank_heads(heads, scores.get) == [(0, 0), (0, 2), (0, 1), (1, 0), (2, 2), (3, 3)]


def test_the_users_rank_the_same_way():
    from circuits.gating.checks import top_facilitating
    from probes.influence import top_heads as influence_top
    from workbench.kv.selectors import top_heads as kv_top

    grid = torch.tensor([[0.2, 0.9], [0.9, 0.1]])
    want = [(0, 1), (1, 0), (0, 0)]
    assert kv_top(grid, [(0, 0), (0, 1), (1, 0), (1, 1)], 3) == want
    series = pd.Series({(a, b): float(grid[a, b]) for a in range(2) for b in range(2)})
    assert influence_top(series, 0.75, 2, 2) == want
    roles = np.full((2, 2), "facilitating", dtype=object)
    assert top_facilitating(roles, grid.numpy(), 3) == want
