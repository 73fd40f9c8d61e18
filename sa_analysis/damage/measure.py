"""Plans chosen by measured output damage (docs/DESIGN.md section 4, "Predicting damage").

1. Every shareable follower with the layer before it as anchor, by head index and under its head map, measured on
   calibration tokens (`PrefixRun`: only the layers from the anchor on are re-run).
2. The dynamic programme over the measured next-token KL (`damage.table` prices it), span by span; a pair it wants that has
   not been measured (a deeper anchor), or a span of two or more followers it has only estimated, is measured (the
   span whole: followers of one anchor interact), and the programme runs again, until its plan rests on
   measurements alone.
3. Interactions between spans, checked: the plan and its neighbours (the best plan without each of its followers)
   are measured whole; the least damaging is recommended, and its measured damage is the prediction for held-out
   text.
4. The similarity planners' plans (with as many shared layers) measured whole on the same
   tokens (`measure_similarity_plans`), so the recommendation is compared with them in the model's output units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..errors import UserError
from ..planner import PlanConstraints, SharePlan, plan_spans, price_pairs, shareable_mask
from ..progress import Say
from .prefix import PrefixRun
from ..planner.record import Damage, MeasuredAlternative, PlanDamage, Prediction
from .table import DamageTable, predict, unmeasured_pairs, unmeasured_spans

if TYPE_CHECKING:
    from ..data import Tokens
    from ..loading import LoadedModel
    from ..report import AttentionReport

MAX_ROUNDS = 20  # measure-and-replan rounds before the plan is taken with estimates left in it (said in its notes)



@dataclass
class DamageSearch:
    """What `plan_from_damage` measured: the table of pairs, the whole plans it checked, the plan it recommends."""

    plan: SharePlan
    table: DamageTable
    checked: list[dict[str, Any]] = field(default_factory=list)  # one per whole plan: followers, aligned, predicted, measured
    run: PrefixRun | None = None  # the calibration tokens' recorded prefix (None once released)
    meter: "Meter | None" = None


class Meter:
    """Counts measurements and says each with its time; with a known number left, an estimate of the time left."""

    def __init__(self, say: Say, after: Callable[[], None] | None = None):
        self.say, self.count, self.seconds = say, 0, 0.0
        self.after = after  # called after each measurement (a frontier saves its state there)

    def timed(self, label: str, work: Callable[[], Damage], left: int | None = None) -> Damage:
        started = time.perf_counter()
        result = work()
        self.seconds += time.perf_counter() - started
        self.count += 1
        eta = "" if left is None else f", about {left * self.seconds / self.count:.0f} s left"
        self.say(f"damage {self.count}: {label} -> KL {result.kl_mean:.4f} nats{eta}")
        if self.after is not None:
            self.after()
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


def measure_spans(run: PrefixRun, table: DamageTable, spans: list[tuple[int, tuple[str, ...]]], meter: Meter) -> None:
    """Measure each span whole: followers a+1 .. a+n all reading anchor a, each its way (head maps from `table`)."""
    for i, (a, ways) in enumerate(spans):
        anchor_of = {a + 1 + j: a for j in range(len(ways))}
        heads = {m: table.maps[(m, a)] for j, m in enumerate(anchor_of) if ways[j] == "aligned"}
        result = meter.timed(f"span {a + 1}-{a + len(ways)} reads {a} whole", lambda: run.damage(anchor_of, heads),
                             left=len(spans) - i - 1)
        table.spans[(a, ways)] = result.to_dict()


def plan_from_damage(loaded: LoadedModel, report: AttentionReport, batch: Tokens, *, budget: Any = None, max_cost: float | None = None,
                     constraints: PlanConstraints = PlanConstraints(), progress: Say | None = None,
                     table: DamageTable | None = None, meter: "Meter | None" = None) -> DamageSearch:
    """The plan of least measured output damage for the budget (or within `max_cost` nats of next-token KL).

    `batch`: calibration tokens (TokenBatch or ids [S, T]), or their `PrefixRun` already recorded; `table`:
    measurements to start from (reused and extended); `meter`: a running count of measurements to go on with.
    """
    check_report_fits(report, loaded)
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
    best_index = min(range(len(checked)), key=lambda i: checked[i]["measured"].kl)
    best = next(p for p in candidates if p.followers == checked[best_index]["followers"]
                and p.aligned_followers == checked[best_index]["aligned"])
    best.damage = PlanDamage.of_checked(checked[best_index], run.n_tokens, run.n_seqs, run.baseline_nll)
    best.method = "optimal (measured damage)"
    plans = f"{len(checked)} whole plan{'s' if len(checked) != 1 else ''}"
    best.notes.append(f"chosen by measured output damage: {meter.count} measurements on {run.n_tokens} calibration tokens "
                      f"({plans} checked for interactions) in {time.perf_counter() - started:.0f} s")
    whole = best.damage.kl
    if max_cost is not None and whole > max_cost:
        best.notes.append(f"measured whole, the plan's next-token KL is {whole:.4g} nats, above --max-cost {max_cost:g}: "
                          f"its followers make each other worse than their sum; lower --max-cost or use --budget")
    table.seconds += time.perf_counter() - started
    return DamageSearch(best, table, checked, run, meter)


def measure_similarity_plans(search: DamageSearch, plans: Mapping[str, Any]) -> dict[str, MeasuredAlternative]:
    """Each similarity planner's plan (`planner.compare_plans`: {method: SharePlan, or why not}) measured whole on the calibration
    tokens the recommendation was measured on; also written into the recommended plan's `damage.baselines`.
    A plan equal to one already measured (the recommendation, or a neighbour it checked) takes that measurement."""
    if search.run is None or search.meter is None:
        raise ValueError("the damage search's prefix was released; measure the baselines before releasing it")
    known = {(tuple(row["followers"]), tuple(row["aligned"])): row["measured"] for row in search.checked}
    measured: dict[str, MeasuredAlternative] = {}
    candidates = {name: plan for name, plan in plans.items() if not isinstance(plan, str) and plan.n_shared}
    for i, (name, plan) in enumerate(candidates.items()):
        key = (tuple(plan.followers), tuple(plan.aligned_followers))
        if key not in known:
            known[key] = search.meter.timed(f"{name} plan {plan.spans_spec()} whole",
                                            lambda: search.run.damage(plan.anchor_of, plan.head_map),
                                            left=len(candidates) - i - 1).summary()
        measured[name] = MeasuredAlternative(list(plan.followers), list(plan.aligned_followers), known[key])
    if search.plan.damage is not None:
        search.plan.damage.baselines = {name: row for name, row in measured.items() if name != "optimal"}
    return measured


def check_report_fits(report: AttentionReport, loaded: LoadedModel) -> None:
    """The attention report must be of the loaded model (as many layers), or no plan from it applies."""
    if report.n_layers != loaded.info.n_layers:
        raise UserError(f"The report is for a {report.n_layers}-layer model but {loaded.info.name} has "
                        f"{loaded.info.n_layers} layers; use this model's report.")


def _helpful_maps(similarity) -> dict[tuple[int, int], list[int]]:
    """{(m, a): head map} for every pair whose Hungarian map predicts less than index sharing (none when off)."""
    if similarity.alignment is None:
        return {}
    helps = similarity.alignment.helps()
    return {(m, a): [int(g) for g in similarity.alignment.maps[m, a]] for m, a in zip(*np.nonzero(helps))}


def _settled_plan(report, table: DamageTable, run: PrefixRun, maps, meter: Meter, budget, max_cost,
                  constraints: PlanConstraints, keep) -> SharePlan:
    """The damage-optimal plan, after measuring every pair it uses that was only estimated, then every span of two
    or more followers it priced by estimate (re-planning each time)."""
    options = dict(budget=budget, max_cost=max_cost, first_shareable=constraints.first_shareable, keep=list(keep),
                   max_span=constraints.max_span, align_heads=constraints.align_heads, mask_change=constraints.mask_change)
    for _round in range(MAX_ROUNDS):
        plan = plan_spans(report, damage=table, **options)
        missing = unmeasured_pairs(plan.anchor_of, table)
        if missing:
            measure_pairs(run, table, missing, maps, meter, constraints.align_heads)
            continue
        spans = unmeasured_spans(plan.followers, plan.head_map, table)
        if not spans:
            return plan
        measure_spans(run, table, spans, meter)
    plan = plan_spans(report, damage=table, **options)
    if unmeasured_pairs(plan.anchor_of, table) or unmeasured_spans(plan.followers, plan.head_map, table):
        plan.notes.append(f"after {MAX_ROUNDS} rounds some of the plan's costs are still estimates (of a deeper anchor from "
                          f"the adjacent damage, or of a span from its followers alone)")
    return plan


def _without(settle: Callable, constraints: PlanConstraints, follower: int) -> SharePlan | None:
    """The best plan that does not share `follower` (a neighbour of the chosen plan), or None when none exists."""
    try:
        return settle(tuple(constraints.keep) + (follower,))
    except UserError:
        return None


def _check(run: PrefixRun, candidates: list[SharePlan], table: DamageTable, meter: Meter) -> list[dict[str, Any]]:
    """The candidates measured whole, the planner's choice first, then its neighbours by predicted damage, until the
    ranking is settled: a neighbour whose prediction (its spans summed), times the largest whole / predicted ratio
    seen so far, exceeds the best measured plan's upper bound cannot come out best, and it is not measured."""
    first, rest = candidates[0], sorted(candidates[1:], key=lambda p: getattr(_predicted(table, p), "kl", float("inf")))
    rows, seen, ratio, best_high = [], set(), 1.0, float("inf")
    for i, plan in enumerate([first] + rest):
        key = (tuple(plan.followers), tuple(sorted(plan.head_map)))
        predicted = _predicted(table, plan)
        predicted_kl = None if predicted is None else predicted.kl
        if key in seen or (rows and predicted_kl is not None and predicted_kl * ratio > best_high):
            continue
        seen.add(key)
        measured = meter.timed(f"plan {plan.spans_spec()} whole", lambda: run.damage(plan.anchor_of, plan.head_map),
                               left=len(candidates) - i - 1)
        summary = measured.summary()
        if predicted_kl:
            ratio = max(ratio, summary.kl / predicted_kl)
        best_high = min(best_high, summary.kl_high)
        rows.append({"followers": list(plan.followers), "aligned": plan.aligned_followers, "spans": plan.spans_spec(),
                     "predicted": predicted, "measured": summary})
    return rows


def _predicted(table: DamageTable, plan: SharePlan) -> Prediction | None:
    """The span model's prediction (`predict`) of a plan whose pairs are all measured, else None."""
    return None if unmeasured_pairs(plan.anchor_of, table) else predict(table, plan.followers, plan.head_map)
