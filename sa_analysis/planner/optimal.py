"""The exact choice of followers: dynamic programming over "next non-shared layer", O(L^2 B)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..errors import UserError
from .costs import Budget
from .layers import DEFAULT_BUDGET_FRACTION, check_max_span, max_followers, resolve_budget, shareable_mask

_TOL = 1e-9  # relative tolerance when comparing a plan's cost with --max-cost


@dataclass
class SpanPrices:
    """Prices of whole spans (an anchor and its n >= 2 consecutive followers), where the sum of the followers' pair
    prices is not the span's cost: `whole[(a, n)]` where the span was measured as a whole; any other span costs its
    sum times `interaction` (how much measured spans exceeded their sums, `damage.table.damage_prices`)."""

    whole: dict[tuple[int, int], float] = field(default_factory=dict)
    interaction: float = 1.0

    def price(self, anchor: int, n: int, pair_sum: float) -> float:
        return self.whole.get((anchor, n), pair_sum * self.interaction)


def optimal_table(costs: np.ndarray, mask: np.ndarray, max_span: int | None, k_max: int,
                  spans: "SpanPrices | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """DP over "next non-shared layer": best[a, k] = least cost of layers a..L-1 given a is non-shared, k followers.

    From non-shared layer `a` the next `n` layers become its followers (all shareable, n <= max_span) and layer
    a+n+1 is the next non-shared one (or the model ends). choice[a, k] is that n (-1: infeasible). O(L^2 k_max).
    Ties keep the smallest n, which leaves followers as deep as possible. A span costs the sum of its pairs, unless
    `spans` prices it as a whole (followers of one anchor interact: `SpanPrices`).
    """
    n_layers = costs.shape[0]
    best = np.full((n_layers + 1, k_max + 1), np.inf)
    choice = np.full((n_layers + 1, k_max + 1), -1, dtype=int)
    best[n_layers, 0] = 0.0
    for a in range(n_layers - 1, -1, -1):
        span_cost = 0.0
        n = 0
        while True:
            b = a + n + 1  # next non-shared layer
            if n > 0:
                span_cost += costs[a + n, a]
            if n <= k_max:
                price = span_cost if spans is None or n < 2 else spans.price(a, n, span_cost)
                cand = price + best[b, : k_max + 1 - n]
                better = cand < best[a, n:]
                best[a, n:][better] = cand[better]
                choice[a, n:][better] = n
            if b >= n_layers or not mask[b] or (max_span is not None and n + 1 > max_span) or n + 1 > k_max:
                break
            n += 1
    return best, choice


def _followers_from_choice(choice: np.ndarray, n_share: int) -> list[int]:
    followers, a, k = [], 0, n_share
    n_layers = choice.shape[0] - 1
    while a < n_layers:
        n = int(choice[a, k])
        followers.extend(range(a + 1, a + 1 + n))
        a, k = a + n + 1, k - n
    return followers


def optimal_followers(
    costs: np.ndarray,
    budget: Budget = None,
    max_cost: float | None = None,
    first_shareable: int = 1,
    keep: Iterable[int] = (),
    max_span: int | None = None,
    spans: SpanPrices | None = None,
) -> list[int]:
    """The follower set of least total cost on a raw [L, L] cost matrix (see `plan_spans` for the arguments);
    `spans`: whole-span prices that replace the sum of a span's pairs."""
    costs = np.asarray(costs, dtype=float)
    n_layers = costs.shape[0]
    mask = shareable_mask(n_layers, first_shareable, keep)
    check_max_span(max_span)
    n_share, threshold = budget_target(budget, max_cost, n_layers, mask, max_span)
    k_max = max_followers(mask, max_span) if threshold else n_share
    best, choice = optimal_table(costs, mask, max_span, k_max, spans)
    if threshold:
        limit = max_cost + _TOL * max(1.0, abs(max_cost))
        n_share = max(k for k in range(k_max + 1) if best[0, k] <= limit or k == 0)
    elif not np.isfinite(best[0, n_share]):
        raise UserError(f"Every way of sharing {n_share} layers has an infinite cost (layer pairs whose attention masks differ are "
                        f"forbidden unless --allow-mask-change, and their KL is infinite once the analysis passes the window, "
                        f"where --cost cosine still prices them); lower the budget.")
    return _followers_from_choice(choice, n_share)


def budget_target(budget: Budget, max_cost: float | None, n_layers: int, mask: np.ndarray, max_span: int | None) -> tuple[int, bool]:
    """(number of followers, threshold mode?) after checking budget / max_cost against the constraints."""
    if budget is not None and max_cost is not None:
        raise UserError("Give either a budget or a max cost, not both; the max cost already decides how many layers to share.")
    if max_cost is not None:
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float, np.integer, np.floating)) or math.isnan(max_cost):
            raise UserError(f"--max-cost must be a number >= 0; got {max_cost!r}.")
        if max_cost < 0:
            raise UserError(f"--max-cost must be >= 0 (costs are divergences); got {max_cost}.")
        return 0, True
    n_shareable, n_possible = int(mask.sum()), max_followers(mask, max_span)
    if budget is None:  # the default: a quarter of the layers, as many as the constraints allow
        return min(resolve_budget(DEFAULT_BUDGET_FRACTION, n_layers), n_possible), False
    n_share = resolve_budget(budget, n_layers)
    if n_share > n_shareable:
        raise UserError(f"The budget of {n_share} layers exceeds the {n_shareable} layers that may be shared under these constraints; lower the budget.")
    if n_share > n_possible:
        raise UserError(f"With max_span={max_span} at most {n_possible} layers can be shared, fewer than the budget of {n_share}; raise max_span or lower the budget.")
    return n_share, False
