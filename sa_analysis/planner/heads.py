"""Head-aligned costs: for each (follower, anchor) pair, the best map from the follower's query heads to the
anchor's (Hungarian matching on the chosen cost), its cost, and the cost of sharing by index.

LiSA (arXiv 2408.01890) found that sharing attention head by head "proves to be ineffective" unless heads are
aligned first; the report's cross-head arrays (`{metric}_mean [L, H, L, H]`) hold what a training-free alignment
needs: `kl_mean[m, h, a, g] = KL(P[m, h] || P[a, g])`, what follower head h loses by reusing anchor head g.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..report import AttentionReport


ALIGN_MODES = ("auto", "on", "off")


_CROSS_HEAD = {"kl": ("kl", False), "cosine": ("cosine_flat", True), "cosine_row": ("cosine_row", True)}


@dataclass
class HeadAlignment:
    """Per (follower m, anchor a < m): head-mean cost by index and under the best one-to-one head map."""

    by_index: np.ndarray  # [L, L] mean over heads of cost[m, h, a, h]
    aligned: np.ndarray  # [L, L] mean over heads of cost[m, h, a, maps[m, a, h]]
    maps: np.ndarray  # [L, L, H] int: anchor head reused by follower head h (identity where not computed)

    def helps(self) -> np.ndarray:
        """[L, L] bool: the map predicts a lower cost than sharing by index (and is not the identity)."""
        n_heads = self.maps.shape[-1]
        identity = (self.maps == np.arange(n_heads)).all(axis=-1)
        tolerance = 1e-6 * np.maximum(np.abs(self.by_index), 1e-12)  # float32 arrays: ignore rounding-level gains
        with np.errstate(invalid="ignore"):
            return ~identity & (self.aligned < self.by_index - tolerance)


def check_align_mode(align_heads: str) -> str:
    if align_heads not in ALIGN_MODES:
        raise UserError(f"Unknown --align-heads {align_heads!r}; choose auto, on or off.")
    return align_heads


def can_align(report: AttentionReport, cost: str) -> bool:
    """Does the report hold the cross-head array this cost needs (js is measured by index only)?"""
    name = _CROSS_HEAD.get(cost, (None,))[0]
    return name is not None and report.has(f"{name}_mean")


def head_alignment(report: AttentionReport, cost: str = "kl") -> HeadAlignment:
    """Hungarian matching of follower heads to anchor heads for every pair a < m, on `cost`'s cross-head array.

    Kept on the report per cost (the plan search asks for it once per candidate plan; an 80-layer, 64-head model
    takes about a second)."""
    cached = report.__dict__.setdefault("_head_alignment", {})
    if cost not in cached:
        cached[cost] = _match_heads(report, cost)
    return cached[cost]


def _match_heads(report: AttentionReport, cost: str) -> HeadAlignment:
    from scipy.optimize import linear_sum_assignment

    if not can_align(report, cost):
        raise UserError(f"The {cost} cost is measured between heads of the same index only, so heads cannot be aligned with it; use --cost kl or cosine, or --align-heads off.")
    n_layers, n_heads = report.array(f"{_CROSS_HEAD[cost][0]}_mean").shape[:2]
    by_index = np.full((n_layers, n_layers), np.inf)
    aligned = np.full((n_layers, n_layers), np.inf)
    maps = np.tile(np.arange(n_heads), (n_layers, n_layers, 1))
    for m in range(1, n_layers):
        for a in range(m):
            pair = _pair_costs(report, cost, m, a)  # [H follower, H anchor]
            by_index[m, a] = np.diagonal(pair).mean()
            finite = np.isfinite(pair)
            if not finite.any():
                continue
            big = pair[finite].max() * 10 + 1e6  # forbidden head pairs: matched only if nothing else is possible
            rows, cols = linear_sum_assignment(np.where(finite, pair, big))
            maps[m, a, rows] = cols
            aligned[m, a] = pair[rows, cols].mean()
    return HeadAlignment(by_index=by_index, aligned=aligned, maps=maps)


def mapped_cost(report: AttentionReport, cost: str, follower: int, anchor: int, heads: list[int]) -> float:
    """Mean over the follower's heads h of cost[follower, h, anchor, heads[h]]: the price of a given head map."""
    if not can_align(report, cost):
        raise UserError(f"The plan maps heads, but the {cost} cost is measured between heads of the same index only; use --cost kl or cosine.")
    pair = _pair_costs(report, cost, follower, anchor)  # [H, H]
    return float(pair[np.arange(len(heads)), heads].mean())


def _pair_costs(report: AttentionReport, cost: str, follower: int, anchor: int) -> np.ndarray:
    """[H, H] cost of the follower's head h reusing the anchor's head g (1 - cosine, or the divergence); NaN (not
    measured) becomes inf, forbidden, as in `cost_matrix`."""
    name, similarity = _CROSS_HEAD[cost]
    pair = np.asarray(report.array(f"{name}_mean")[follower, :, anchor, :], dtype=float)
    pair = 1.0 - pair if similarity else pair
    return np.where(np.isnan(pair), np.inf, pair)
