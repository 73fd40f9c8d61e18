"""Measured output damage as the planner's cost: what each follower, and each span, costs the next-token distribution.

A `DamageTable` holds measurements made on calibration tokens (`damage.measure` makes them): for a follower `m`
reusing anchor `a` alone (the layers between keep their own attention), by head index and under the pair's head map,
the next-token KL(baseline || patched) and the NLL change per sequence; and spans (an anchor with n >= 2 consecutive
followers) measured whole. The planner prices a plan span by span (`damage_prices`): a one-follower span by its
measurement alone, a longer span by its whole measurement where there is one, else by the sum of its followers
alone times the median whole / sum ratio of the spans measured so far. Followers of one anchor interact (on
Qwen2.5-Coder-0.5B a 3-span measured whole is 1.0-2.3x the sum of its followers alone), separate spans hardly do
(1.0-1.2x), so summing spans is the model and the whole plan is still checked (BENCHMARKS.md). Pairs not yet
measured are estimated from the follower's adjacent measurement scaled by the attention similarity, until the plan
the dynamic programme chooses uses measurements only (`damage.measure.plan_from_damage`). The planner's
`plan_spans(report, damage=table)` asks the table for its prices (`DamageTable.prices`). Needs numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..planner.layers import anchors_for
from ..planner.optimal import SpanPrices
from ..planner.pricing import PairPrices
from ..planner.record import FollowerDamage, Prediction, SpanDamage
from ..stats import interval

ESTIMATE_FLOOR = 0.5  # an unmeasured deeper anchor is estimated at no less than this share of the adjacent damage


@dataclass
class DamageTable:
    """Output damage measured on calibration tokens; per-sequence values, so that sums get honest intervals.

    `pairs[(m, a, way)]` = {"kl": [S], "nll_change": [S], "top1": [S]} for follower m reading anchor a alone, `way`
    "index" or "aligned" (under `maps[(m, a)]`); `spans[(a, ways)]` the same for followers a+1 .. a+len(ways) all
    reading anchor a, each its way. `baseline_nll`: the unpatched model's mean NLL on these tokens.
    """

    n_layers: int
    n_seqs: int
    n_tokens: int
    baseline_nll: float
    pairs: dict[tuple[int, int, str], dict[str, list[float]]] = field(default_factory=dict)
    maps: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    spans: dict[tuple[int, tuple[str, ...]], dict[str, list[float]]] = field(default_factory=dict)
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

    def pair_sum(self, anchor: int, ways: Sequence[str], what: str = "kl") -> np.ndarray:
        """[S] per-sequence sum of the span's followers measured alone (each its way)."""
        return np.sum([self.pairs[(anchor + 1 + i, anchor, way)][what] for i, way in enumerate(ways)], axis=0)

    def interaction(self) -> float:
        """Median over the spans measured whole (and their followers alone) of whole / sum of the followers alone;
        1 before any."""
        ratios = [float(np.mean(v["kl"])) / total for (a, ways), v in self.spans.items()
                  if all(self.has(a + 1 + i, a, way) for i, way in enumerate(ways))
                  and (total := float(np.mean(self.pair_sum(a, ways)))) > 0]
        return float(np.median(ratios)) if ratios else 1.0

    def prices(self, similarity: PairPrices, align: str) -> PairPrices:
        """The planner's prices in the model's output units (`damage_prices`)."""
        return damage_prices(self, similarity, align)

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_seqs": self.n_seqs, "n_tokens": self.n_tokens,
                "baseline_nll": self.baseline_nll, "seconds": self.seconds,
                "pairs": [{"follower": m, "anchor": a, "way": way, **values} for (m, a, way), values in sorted(self.pairs.items())],
                "maps": [{"follower": m, "anchor": a, "heads": heads} for (m, a), heads in sorted(self.maps.items())],
                "spans": [{"anchor": a, "ways": list(ways), **values} for (a, ways), values in sorted(self.spans.items())]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DamageTable":
        table = cls(int(data["n_layers"]), int(data["n_seqs"]), int(data["n_tokens"]), float(data["baseline_nll"]),
                    seconds=float(data.get("seconds", 0.0)))
        for row in data.get("pairs", []):
            table.pairs[(int(row["follower"]), int(row["anchor"]), str(row["way"]))] = {
                k: [float(v) for v in row[k]] for k in ("kl", "nll_change", "top1")}
        for row in data.get("maps", []):
            table.maps[(int(row["follower"]), int(row["anchor"]))] = [int(g) for g in row["heads"]]
        for row in data.get("spans", []):
            table.spans[(int(row["anchor"]), tuple(str(w) for w in row["ways"]))] = {
                k: [float(v) for v in row[k]] for k in ("kl", "nll_change", "top1")}
        return table


def damage_prices(table: DamageTable, prices: PairPrices, align: str) -> PairPrices:
    """Prices in the model's output units: `costs[m, a]` = measured next-token KL of follower m reading anchor a alone
    (the better way under `align`), estimated where not measured, inf where `prices` forbids the pair.

    An unmeasured pair is estimated from the follower's adjacent measurement times how much less alike the deeper
    anchor is (the similarity cost's ratio), at least `ESTIMATE_FLOOR` of it; `estimated[m, a]` marks them. Spans
    measured whole are priced by that measurement (`spans`), other spans of two or more followers by their sum times
    the table's `interaction`.
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
    spans = SpanPrices(interaction=table.interaction())
    for (a, ways), values in table.spans.items():
        if ways == _ways(use_map, a, len(ways)):
            spans.whole[(a, len(ways))] = float(np.mean(values["kl"]))
    return PairPrices(costs=costs, by_index=by_index, use_map=use_map, alignment=prices.alignment, windows=prices.windows,
                      mask_forbidden=prices.mask_forbidden, align_heads=align, notes=list(prices.notes),
                      estimated=estimated, spans=spans)


def _ways(use_map: np.ndarray, anchor: int, n: int) -> tuple[str, ...]:
    return tuple("aligned" if use_map[anchor + 1 + i, anchor] else "index" for i in range(n))


def _estimate(table: DamageTable, prices: PairPrices, m: int, a: int, align: str) -> float:
    adjacent = table.value(m, m - 1, table.way_for(m, m - 1, align))
    near, far = float(prices.costs[m, m - 1]), float(prices.costs[m, a])
    ratio = far / near if near > 0 and math.isfinite(near) and math.isfinite(far) else 1.0
    return adjacent * max(ratio, ESTIMATE_FLOOR)


def unmeasured_pairs(plan_anchor_of: Mapping[int, int], table: DamageTable) -> list[tuple[int, int]]:
    """The (follower, anchor) pairs of a plan that have no measurement yet."""
    return [(m, a) for m, a in sorted(plan_anchor_of.items()) if not table.has(m, a)]


def plan_spans_ways(followers: Iterable[int], head_map: Mapping[int, Sequence[int]], n_layers: int) -> list[tuple[int, tuple[str, ...]]]:
    """(anchor, each follower's way) for every span of the plan, in layer order."""
    spans: dict[int, list[str]] = {}
    for m, a in anchors_for(followers, n_layers).items():
        spans.setdefault(a, []).append("aligned" if m in head_map else "index")
    return [(a, tuple(ways)) for a, ways in spans.items()]


def unmeasured_spans(followers: Iterable[int], head_map: Mapping[int, Sequence[int]], table: DamageTable) -> list[tuple[int, tuple[str, ...]]]:
    """The spans of two or more followers of a plan that have not been measured whole."""
    return [(a, ways) for a, ways in plan_spans_ways(followers, head_map, table.n_layers)
            if len(ways) > 1 and (a, ways) not in table.spans]


def predict(table: DamageTable, followers: Iterable[int], head_map: Mapping[int, Sequence[int]]) -> Prediction:
    """The span model's prediction for a plan, with `LEVEL` intervals over sequences: each follower's measured damage
    alone (with its anchor, by its way of sharing), each span measured whole (`spans`, named "first-last"), and
    the total: per sequence, the sum over spans of the whole measurement, or of the followers alone where a span
    was not measured whole (`additive` lists those). Needs every pair measured."""
    followers = sorted(followers)
    anchor_of = anchors_for(followers, table.n_layers)
    per_follower = {}
    for m, a in anchor_of.items():
        way = "aligned" if m in head_map else "index"
        values = table.pairs[(m, a, way)]
        per_follower[m] = FollowerDamage(anchor=a, way=way, **interval("kl", values["kl"]),
                                         **interval("nll_change", values["nll_change"]))
    kl, nll, spans, additive = np.zeros(table.n_seqs), np.zeros(table.n_seqs), {}, []
    for a, ways in plan_spans_ways(followers, head_map, table.n_layers):
        name = f"{a + 1}-{a + len(ways)}" if len(ways) > 1 else f"{a + 1}"
        whole = table.spans.get((a, ways))
        if whole is not None:
            spans[name] = SpanDamage(anchor=a, **interval("kl", whole["kl"]), **interval("nll_change", whole["nll_change"]))
        elif len(ways) > 1:
            additive.append(name)
        kl += whole["kl"] if whole is not None else table.pair_sum(a, ways)
        nll += whole["nll_change"] if whole is not None else table.pair_sum(a, ways, "nll_change")
    return Prediction(**interval("kl", kl), **interval("nll_change", nll), spans=spans, additive=additive,
                      followers=per_follower)
