"""Measured output damage as the planner's cost: what each follower costs the model's next-token distribution.

A `DamageTable` holds measurements made on calibration tokens (`validate.damage` makes them): for a follower `m`
reusing anchor `a` alone (the layers between keep their own attention), by head index and under the pair's head map,
the next-token KL(baseline || patched) and the NLL change per sequence; and whole plans measured as they are. The
planner prices a plan by the sum of its followers' measured KL (`damage_prices`), the additive model, which ranks
the measured perplexity of spans far better than summed attention KL (BENCHMARKS.md); pairs not yet measured are
estimated from the follower's adjacent measurement scaled by the attention similarity, until the plan the dynamic
programme chooses uses measured pairs only (`validate.damage.plan_from_damage`). Needs numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .layers import anchors_for
from .pricing import PairPrices

WAYS = ("index", "aligned")
OUTPUT_COST = "output-kl"  # the cost name of a plan priced by measured damage
ESTIMATE_FLOOR = 0.5  # an unmeasured deeper anchor is estimated at no less than this share of the adjacent damage
LEVEL = 0.95  # the intervals' coverage


@dataclass
class DamageTable:
    """Output damage measured on calibration tokens; per-sequence values, so that sums get honest intervals.

    `pairs[(m, a, way)]` = {"kl": [S], "nll_change": [S], "top1": [S]} for follower m reading anchor a alone, `way`
    "index" or "aligned" (under `maps[(m, a)]`). `baseline_nll`: the unpatched model's mean NLL on these tokens.
    """

    n_layers: int
    n_seqs: int
    n_tokens: int
    baseline_nll: float
    pairs: dict[tuple[int, int, str], dict[str, list[float]]] = field(default_factory=dict)
    maps: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def has(self, m: int, a: int, way: str = "index") -> bool:
        return (m, a, way) in self.pairs

    def value(self, m: int, a: int, way: str, what: str = "kl") -> float:
        return float(np.mean(self.pairs[(m, a, way)][what]))

    def way_for(self, m: int, a: int, align: str) -> str:
        """How follower m shares with anchor a as measured: aligned where its map measured less KL than index
        sharing (auto), wherever a map was measured (on), never (off)."""
        if align == "off" or not self.has(m, a, "aligned"):
            return "index"
        if align == "on" or not self.has(m, a, "index"):
            return "aligned"
        return "aligned" if self.value(m, a, "aligned") < self.value(m, a, "index") else "index"

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_seqs": self.n_seqs, "n_tokens": self.n_tokens,
                "baseline_nll": self.baseline_nll, "seconds": self.seconds,
                "pairs": [{"follower": m, "anchor": a, "way": way, **values} for (m, a, way), values in sorted(self.pairs.items())],
                "maps": [{"follower": m, "anchor": a, "heads": heads} for (m, a), heads in sorted(self.maps.items())]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DamageTable":
        table = cls(int(data["n_layers"]), int(data["n_seqs"]), int(data["n_tokens"]), float(data["baseline_nll"]),
                    seconds=float(data.get("seconds", 0.0)))
        for row in data.get("pairs", []):
            table.pairs[(int(row["follower"]), int(row["anchor"]), str(row["way"]))] = {
                k: [float(v) for v in row[k]] for k in ("kl", "nll_change", "top1")}
        for row in data.get("maps", []):
            table.maps[(int(row["follower"]), int(row["anchor"]))] = [int(g) for g in row["heads"]]
        return table


def damage_prices(table: DamageTable, prices: PairPrices, align: str) -> PairPrices:
    """Prices in the model's output units: `costs[m, a]` = measured next-token KL of follower m reading anchor a alone
    (the better way under `align`), estimated where not measured, inf where `prices` forbids the pair.

    An unmeasured pair is estimated from the follower's adjacent measurement times how much less alike the deeper
    anchor is (the similarity cost's ratio), at least `ESTIMATE_FLOOR` of it; `estimated[m, a]` marks them.
    """
    n = table.n_layers
    costs = np.full((n, n), np.inf)
    by_index = np.full((n, n), np.nan)  # measured damage sharing by index, for the plan table's "by index" column
    use_map = np.zeros((n, n), dtype=bool)
    estimated = np.zeros((n, n), dtype=bool)
    for m in range(1, n):
        for a in range(m):
            if prices.mask_forbidden[m, a]:
                continue
            if table.has(m, a):
                by_index[m, a] = table.value(m, a, "index")
            if table.has(m, a) or table.has(m, a, "aligned"):
                way = table.way_for(m, a, align)
                costs[m, a], use_map[m, a] = table.value(m, a, way), way == "aligned"
            elif table.has(m, m - 1) and a < m - 1:
                costs[m, a], estimated[m, a] = _estimate(table, prices, m, a, align), True
    return PairPrices(costs=costs, by_index=by_index, use_map=use_map, alignment=prices.alignment, windows=prices.windows,
                      mask_forbidden=prices.mask_forbidden, align_heads=align, notes=list(prices.notes),
                      estimated=estimated)


def _estimate(table: DamageTable, prices: PairPrices, m: int, a: int, align: str) -> float:
    adjacent = table.value(m, m - 1, table.way_for(m, m - 1, align))
    near, far = float(prices.costs[m, m - 1]), float(prices.costs[m, a])
    ratio = far / near if near > 0 and math.isfinite(near) and math.isfinite(far) else 1.0
    return adjacent * max(ratio, ESTIMATE_FLOOR)


def unmeasured_pairs(plan_anchor_of: Mapping[int, int], table: DamageTable) -> list[tuple[int, int]]:
    """The (follower, anchor) pairs of a plan that have no measurement yet."""
    return [(m, a) for m, a in sorted(plan_anchor_of.items()) if not table.has(m, a)]


def predict(table: DamageTable, followers: Iterable[int], head_map: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """The additive prediction for a plan: each follower's measured damage alone (with its anchor, by its way of
    sharing), and their sum per sequence, with `LEVEL` intervals over sequences. Needs every pair measured."""
    anchor_of = anchors_for(followers, table.n_layers)
    per_follower, kl_sum, nll_sum = {}, np.zeros(table.n_seqs), np.zeros(table.n_seqs)
    for m, a in anchor_of.items():
        way = "aligned" if m in head_map else "index"
        values = table.pairs[(m, a, way)]
        kl_sum += values["kl"]
        nll_sum += values["nll_change"]
        per_follower[m] = {"anchor": a, "way": way, **interval("kl", values["kl"]), **interval("nll_change", values["nll_change"])}
    return {"followers": per_follower, **interval("kl", kl_sum), **interval("nll_change", nll_sum)}


def interval(name: str, values: Sequence[float]) -> dict[str, float]:
    """{name: mean, name_low, name_high} over sequences (`LEVEL` Student-t interval)."""
    mean, low, high = mean_and_interval(list(map(float, values)), LEVEL)
    if name == "kl":  # a divergence: the interval stops at 0 (few sequences make the t interval wide)
        low = max(low, 0.0)
    return {name: mean, f"{name}_low": low, f"{name}_high": high}


def ppl_change(nll_change: float) -> float:
    """Relative perplexity change implied by a mean NLL change (nats)."""
    return math.expm1(nll_change)


def mean_and_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-sequence values and its Student-t interval (sequences are independent
    samples of text; with one sequence the interval is the mean itself)."""
    n = len(values)
    mean = float(sum(values) / n)
    if n < 2:
        return mean, mean, mean
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half
