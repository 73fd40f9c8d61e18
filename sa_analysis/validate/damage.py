"""Plans chosen by measured output damage (docs/DESIGN.md section 4, "Predicting damage").

1. Every shareable follower with the layer before it as anchor, by head index and under its head map, measured on
   calibration tokens (`PrefixRun`: only the layers from the anchor on are re-run).
2. The dynamic programme over the measured next-token KL (`planner.damage`); a pair it wants that has not been
   measured (a deeper anchor) is measured, and the programme runs again, until its plan rests on measurements alone.
3. Interactions, checked: the plan and its neighbours (the best plan without each of its followers) are measured
   whole; the least damaging is recommended, and its measured damage is the prediction for held-out text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..planner import PlanConstraints, SharePlan, plan_spans, price_pairs, shareable_mask
from ..planner.damage import DamageTable, interval, predict, unmeasured_pairs
from .prefix import Damage, PrefixRun

MAX_ROUNDS = 20  # measure-and-replan rounds before the plan is taken with estimates left in it (said in its notes)

Say = Callable[[str], None]


@dataclass
class DamageSearch:
    """What `plan_from_damage` measured: the table of pairs, the whole plans it checked, the plan it recommends."""

    plan: SharePlan
    table: DamageTable
    checked: list[dict[str, Any]] = field(default_factory=list)  # one per whole plan: followers, aligned, predicted, measured


class Meter:
    """Counts measurements and says each with its time; with a known number left, an estimate of the time left."""

    def __init__(self, say: Say):
        self.say, self.count, self.seconds = say, 0, 0.0

    def timed(self, label: str, work: Callable[[], Damage], left: int | None = None) -> Damage:
        started = time.perf_counter()
        result = work()
        self.seconds += time.perf_counter() - started
        self.count += 1
        eta = "" if left is None else f", about {left * self.seconds / self.count:.0f} s left"
        self.say(f"damage {self.count}: {label} -> KL {result.kl_mean:.4f} nats{eta}")
        return result


def measure_pairs(run: PrefixRun, table: DamageTable, pairs: list[tuple[int, int]], maps: dict[tuple[int, int], list[int]],
                  meter: Meter, align: str) -> None:
    """Measure follower m reading anchor a alone for each pair, by index and (unless `align` is off) under its map."""
    jobs = [(m, a, "index") for m, a in pairs] + [(m, a, "aligned") for m, a in pairs if align != "off" and (m, a) in maps]
    for i, (m, a, way) in enumerate(jobs):
        heads = {m: maps[(m, a)]} if way == "aligned" else None
        result = meter.timed(f"layer {m} reads {a}" + (" (head map)" if heads else ""),
                             lambda: run.damage({m: a}, heads, probe=True), left=len(jobs) - i - 1)
        table.pairs[(m, a, way)] = result.to_dict()
        if heads:
            table.maps[(m, a)] = list(heads[m])


def plan_from_damage(loaded: Any, report: Any, batch: Any, *, budget: Any = None, max_cost: float | None = None,
                     constraints: PlanConstraints = PlanConstraints(), progress: Say | None = None,
                     table: DamageTable | None = None, meter: "Meter | None" = None) -> DamageSearch:
    """The plan of least measured output damage for the budget (or within `max_cost` nats of next-token KL).

    `batch`: calibration tokens (TokenBatch or ids [S, T]), or their `PrefixRun` already recorded; `table`:
    measurements to start from (reused and extended); `meter`: a running count of measurements to go on with.
    """
    if report.n_layers != loaded.info.n_layers:
        raise UserError(f"The report is for a {report.n_layers}-layer model but {loaded.info.name} has {loaded.info.n_layers} layers; use this model's report.")
    started = time.perf_counter()
    meter = meter or Meter(progress or (lambda _m: None))
    run = batch if isinstance(batch, PrefixRun) else PrefixRun.record(loaded.model, batch)
    table = table or DamageTable(report.n_layers, run.n_seqs, run.n_tokens, run.baseline_nll)
    similarity = price_pairs(report, "kl", constraints.align_heads, mask_change=constraints.mask_change)
    maps = _helpful_maps(similarity)
    mask = shareable_mask(report.n_layers, constraints.first_shareable, constraints.keep)
    adjacent = [(m, m - 1) for m in range(1, report.n_layers) if mask[m] and not similarity.mask_forbidden[m, m - 1]
                and not table.has(m, m - 1)]
    measure_pairs(run, table, adjacent, maps, meter, constraints.align_heads)
    settle = lambda keep: _settled_plan(report, table, run, maps, meter, budget, max_cost, constraints, keep)  # noqa: E731
    plan = settle(constraints.keep)
    candidates = [plan] + [alt for alt in (_without(settle, constraints, f) for f in plan.followers) if alt is not None]
    checked = _check(run, candidates, table, meter)
    best_index = min(range(len(checked)), key=lambda i: checked[i]["measured"]["kl"])
    best = next(p for p in candidates if p.followers == checked[best_index]["followers"]
                and p.aligned_followers == checked[best_index]["aligned"])
    best.damage = plan_damage(checked[best_index], run)
    best.method = "optimal (measured damage)"
    plans = f"{len(checked)} whole plan{'s' if len(checked) != 1 else ''}"
    best.notes.append(f"chosen by measured output damage: {meter.count} measurements on {run.n_tokens} calibration tokens "
                      f"({plans} checked for interactions) in {time.perf_counter() - started:.0f} s")
    whole = best.damage["plan"]["kl"]
    if max_cost is not None and whole > max_cost:
        best.notes.append(f"measured whole, the plan's next-token KL is {whole:.4g} nats, above --max-cost {max_cost:g}: "
                          f"its followers make each other worse than their sum; lower --max-cost or use --budget")
    table.seconds += time.perf_counter() - started
    return DamageSearch(best, table, checked)


def plan_damage(checked: dict[str, Any], run: PrefixRun) -> dict[str, Any]:
    """The plan's `damage` record: each follower alone and their sum (the additive prediction), the whole plan as
    measured (interactions included), and what they rest on."""
    predicted = checked["predicted"] or {"followers": {}}
    return {"followers": predicted["followers"], "sum": {k: v for k, v in predicted.items() if k != "followers"},
            "plan": checked["measured"], "n_tokens": run.n_tokens, "n_seqs": run.n_seqs, "baseline_nll": run.baseline_nll,
            "basis": "next-token KL(baseline || patched) and NLL change on calibration tokens, 95 % intervals over sequences"}


def _helpful_maps(similarity) -> dict[tuple[int, int], list[int]]:
    """{(m, a): head map} for every pair whose Hungarian map predicts less than index sharing (none when off)."""
    if similarity.alignment is None:
        return {}
    helps = similarity.alignment.helps()
    return {(m, a): [int(g) for g in similarity.alignment.maps[m, a]] for m, a in zip(*np.nonzero(helps))}


def _settled_plan(report, table: DamageTable, run: PrefixRun, maps, meter: Meter, budget, max_cost,
                  constraints: PlanConstraints, keep) -> SharePlan:
    """The damage-optimal plan, after measuring every pair it uses that was only estimated (re-planning each time)."""
    options = dict(budget=budget, max_cost=max_cost, first_shareable=constraints.first_shareable, keep=list(keep),
                   max_span=constraints.max_span, align_heads=constraints.align_heads, mask_change=constraints.mask_change)
    for _round in range(MAX_ROUNDS):
        plan = plan_spans(report, damage=table, **options)
        missing = unmeasured_pairs(plan.anchor_of, table)
        if not missing:
            return plan
        measure_pairs(run, table, missing, maps, meter, constraints.align_heads)
    plan = plan_spans(report, damage=table, **options)
    if unmeasured_pairs(plan.anchor_of, table):
        plan.notes.append(f"after {MAX_ROUNDS} rounds some followers' costs are still estimates from their adjacent damage")
    return plan


def _without(settle: Callable, constraints: PlanConstraints, follower: int) -> SharePlan | None:
    """The best plan that does not share `follower` (a neighbour of the chosen plan), or None when none exists."""
    try:
        return settle(tuple(constraints.keep) + (follower,))
    except UserError:
        return None


def _check(run: PrefixRun, candidates: list[SharePlan], table: DamageTable, meter: Meter) -> list[dict[str, Any]]:
    """The candidates measured whole, the planner's choice first, then its neighbours by predicted damage, until the
    ranking is settled: a neighbour whose sum of followers alone, times the largest whole / sum ratio seen so far,
    exceeds the best measured plan's upper bound cannot come out best, and it and those after it are not measured."""
    first, rest = candidates[0], sorted(candidates[1:], key=lambda p: _predicted(table, p) or float("inf"))
    rows, seen, ratio, best_high = [], set(), 1.0, float("inf")
    for i, plan in enumerate([first] + rest):
        key = (tuple(plan.followers), tuple(sorted(plan.head_map)))
        predicted_kl = _predicted(table, plan)
        if key in seen or (rows and predicted_kl is not None and predicted_kl * ratio > best_high):
            continue
        seen.add(key)
        measured = meter.timed(f"plan {plan.spans_spec()} whole", lambda: run.damage(plan.anchor_of, plan.head_map),
                               left=len(candidates) - i - 1)
        summary = {**interval("kl", measured.kl), **interval("nll_change", measured.nll_change),
                   "top1": float(np.mean(measured.top1))}
        if predicted_kl:
            ratio = max(ratio, summary["kl"] / predicted_kl)
        best_high = min(best_high, summary["kl_high"])
        predicted = None if predicted_kl is None else predict(table, plan.followers, plan.head_map)
        rows.append({"followers": list(plan.followers), "aligned": plan.aligned_followers, "spans": plan.spans_spec(),
                     "predicted": predicted, "measured": summary})
    return rows


def _predicted(table: DamageTable, plan: SharePlan) -> float | None:
    """The additive prediction (sum of followers alone) of a plan whose pairs are all measured, else None."""
    if unmeasured_pairs(plan.anchor_of, table):
        return None
    return float(sum(table.value(m, a, "aligned" if m in plan.head_map else "index") for m, a in plan.anchor_of.items()))
