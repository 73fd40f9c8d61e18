"""How stable a plan is: the planner rerun on bootstrap resamples of the analysed sequences.

Each resample draws the report's S sequences with replacement, averages their layer x layer costs and plans again
with the same budget, constraints, head maps and sensitivity. A follower chosen in 95 % of the reruns is a choice
the data supports; one chosen in 40 % is a coin toss between near-equal layers. Head-aligned prices keep the
alignment gain measured on all sequences (the report holds cross-head values as means only).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..report import AttentionReport
from .costs import cost_matrix


DEFAULT_RESAMPLES = 100


def plan_stability(report: AttentionReport, cost: str, prices: np.ndarray, solve: Callable[[np.ndarray], list[int]],
                   followers: list[int], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[dict[int, float], float] | None:
    """({follower: share of reruns choosing it}, share of reruns choosing exactly `followers`), or None when the
    report holds fewer than two sequences.

    `prices` [L, L] are the prices the plan was made with; a resample shifts them by its own index costs minus
    the full sample's. `solve` maps a price matrix to a follower set (the planner with its settings).
    """
    n_seqs = _n_sequences(report, cost)
    if n_resamples <= 0 or n_seqs < 2:
        return None
    full = cost_matrix(report, cost)
    with np.errstate(invalid="ignore"):
        shift = np.where(np.isfinite(prices) & np.isfinite(full), prices - full, np.inf)  # aligned gain, forbidden pairs
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(followers, 0)
    same = 0
    for _ in range(n_resamples):
        resampled = cost_matrix(report, cost, rng.integers(0, n_seqs, n_seqs)) + shift
        chosen = solve(np.where(np.isnan(resampled), np.inf, resampled))
        same += chosen == list(followers)
        for m in set(chosen) & set(counts):
            counts[m] += 1
    return {m: c / n_resamples for m, c in counts.items()}, same / n_resamples


def _n_sequences(report: AttentionReport, cost: str) -> int:
    name = {"kl": "kl_layers", "cosine": "cosine_flat_layers", "cosine_row": "cosine_row_layers"}.get(cost, "js_adjacent")
    return int(report.array(name).shape[0]) if report.has(name) else 0
