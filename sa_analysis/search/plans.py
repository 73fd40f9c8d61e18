"""`search_plans`: plan -> measure -> re-plan (docs/DESIGN.md section 4), with measured sensitivity fed back; the
budgets walked by the one budget sweep (`search.sweep`), the chosen plan proved on held-out text by `validate`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Any, Callable, Mapping, Sequence


from ..artefact import JsonArtefact, Record
from ..damage.logprobs import token_ids
from ..damage.table import DamageTable
from ..planner import PlanConstraints
from ..planner.record import SEARCH_BASIS, Damage, PlanDamage, Prediction, Summary
from ..stats import ppl_change as ppl_change_of
from ..validate.report import DEFAULT_TOLERANCE, ValidationReport
from ..validate.run import check_options, validate_plan
from .sweep import BudgetSweep

if TYPE_CHECKING:
    from ..data import Tokens
    from ..loading import LoadedModel, ModelInfo
    from ..report import AttentionReport

SEARCH_FORMAT = "sa-analysis/plan-search"


@dataclass
class MeasuredPlan(Record):
    """One plan the search measured whole on calibration tokens: how it was found, what it shares, its damage (KL and
    perplexity change with 95 % intervals, top-1 agreement) and the span model's prediction where the planner made
    one; one row of `PlanSearch` (search.json keeps these fields, in this order)."""

    stage: str  # "sensitivity" (one follower alone with the layer before it) or "candidate" (a plan for a budget)
    method: str  # how it was first found ("measured damage", "similarity", "single layer", ...)
    methods: list[str]  # every method that found it
    n_shared: int
    spans: str
    measured: Summary  # `Damage.summary()`: kl, nll_change with _low / _high, top1
    predicted: Prediction | None  # the span model's prediction, or None
    followers: list[int]
    aligned: list[int]  # followers that reuse their anchor's heads through a head map
    passed: bool  # perplexity change within the search's tolerance

    RECORDS: ClassVar[dict[str, type]] = {"measured": Summary, "predicted": Prediction}
    DERIVED: ClassVar[tuple[str, ...]] = ("predicted_kl", "predicted_nll_change", "ppl_change", "ppl_change_low",
                                          "ppl_change_high", "kl_mean", "kl_low", "kl_high", "top1_agreement")

    @classmethod
    def of(cls, stage: str, method: str, plan: Any, measured: Summary, tolerance: float,
           predicted: Prediction | None) -> "MeasuredPlan":
        """A plan and its measurement on calibration text (and the additive prediction from its followers alone)."""
        return cls(stage=stage, method=method, methods=[method], n_shared=plan.n_shared, spans=plan.spans_spec(),
                   measured=measured, predicted=predicted, followers=list(plan.followers),
                   aligned=list(plan.aligned_followers), passed=bool(ppl_change_of(measured.nll_change) <= tolerance))

    def to_dict(self) -> dict[str, Any]:
        """The fields, with the values derived from the measurement and the prediction written beside them (the
        table, the figure and readers of search.json take them from there), `passed` last, as search.json has them."""
        data = super().to_dict()
        passed = data.pop("passed")
        return {**data, **{name: getattr(self, name) for name in self.DERIVED}, "passed": passed}

    @property
    def predicted_kl(self) -> float | None:
        return None if self.predicted is None else self.predicted.kl

    @property
    def predicted_nll_change(self) -> float | None:
        return None if self.predicted is None else self.predicted.nll_change

    @property
    def ppl_change(self) -> float:
        """Perplexity ratio - 1 on the calibration tokens (exp(NLL change) - 1), and its interval below."""
        return ppl_change_of(self.measured.nll_change)

    @property
    def ppl_change_low(self) -> float:
        return ppl_change_of(self.measured.nll_change_low)

    @property
    def ppl_change_high(self) -> float:
        return ppl_change_of(self.measured.nll_change_high)

    @property
    def kl_mean(self) -> float:
        return self.measured.kl

    @property
    def kl_low(self) -> float:
        return self.measured.kl_low

    @property
    def kl_high(self) -> float:
        return self.measured.kl_high

    @property
    def top1_agreement(self) -> float:
        return self.measured.top1

    @property
    def key(self) -> tuple:
        """What makes two measured plans the same plan: its followers, and which of them map heads."""
        return tuple(self.followers), tuple(sorted(self.aligned))


@dataclass
class PlanSearch(JsonArtefact):
    """What `search_plans` tried and chose: every measured plan, the sensitivity it fed back, the final check."""

    FORMAT: ClassVar[str] = SEARCH_FORMAT
    WHAT: ClassVar[str] = "plan search"
    FILE: ClassVar[str] = "search.json"
    MADE_BY: ClassVar[str] = "`sa-analyze recommend-spans --validate`"

    tolerance: float
    mode: str
    rows: list[MeasuredPlan]  # one per plan measured on the calibration text
    sensitivity: dict[int, float]  # follower -> next-token KL (nats) when shared alone with the layer before it
    best: dict[str, Any] | None  # the chosen plan (SharePlan.to_dict()), None when nothing passes
    validation: ValidationReport | None  # the chosen plan re-checked on held-out text
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_plan(self):
        from ..planner import SharePlan

        return None if self.best is None else SharePlan.from_dict(self.best)

    def payload(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "mode": self.mode, "rows": [row.to_dict() for row in self.rows],
                "sensitivity": {str(k): v for k, v in self.sensitivity.items()}, "best": self.best,
                "validation": None if self.validation is None else self.validation.to_dict(), "meta": self.meta}

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], source: str) -> "PlanSearch":
        validation = data.get("validation")
        return cls(tolerance=data["tolerance"], mode=data["mode"], rows=[MeasuredPlan.from_dict(r) for r in data["rows"]],
                   sensitivity={int(k): v for k, v in data["sensitivity"].items()}, best=data["best"],
                   validation=None if validation is None else ValidationReport.from_dict(validation, source),
                   meta=data.get("meta", {}))


def search_plans(
    loaded: LoadedModel,
    report: AttentionReport,
    calibration: Tokens,
    heldout: Tokens,
    *,
    budgets: Sequence[int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    mode: str = "fast",
    cost: str = "kl",
    constraints: PlanConstraints = PlanConstraints(),
    batch_size: int = 4,
    measure_speed: bool = False,
    tasks: Sequence[str] | None = None,
    stop_early: bool = True,
    progress: Callable[[str], None] | None = None,
    table: DamageTable | None = None,
) -> PlanSearch:
    """Find the plan sharing the most layers within `tolerance`, by measurement on `calibration`, proved on `heldout`.

    1. Measured damage (`validate.damage`): every shareable layer alone with the layer before it, by index and
       through its head map; deeper anchors as the planner asks for them (`table`: measurements to start from).
    2. For each budget in increasing order (default 1, 2, ... up to what the constraints allow): the plan of least
       measured damage and its neighbours, measured whole (until the ranking is settled), and the plan similarity
       alone would choose (and under auto the same by index), for comparison. With `stop_early`, the first budget
       with no candidate within tolerance ends the search.
    3. The best passing plan (most layers shared, then least next-token KL) is validated on the held-out text.
    Only the layers from each plan's lowest anchor on are re-run (`PrefixRun`); the choice is made on calibration
    text and checked on held-out text, so the final numbers are not selected on.
    """
    from .. import planner

    check_options(mode, tolerance)
    say = progress or (lambda _msg: None)
    sweep = BudgetSweep.start(loaded, report, calibration, constraints=constraints, table=table, progress=say)
    run, table, meter = sweep.run, sweep.table, sweep.meter
    mask = planner.shareable_mask(report.n_layers, constraints.first_shareable, constraints.keep)
    rows: list[dict[str, Any]] = []
    proposed: dict[tuple, Any] = {}
    limit = planner.max_followers(mask, constraints.max_span)
    for budget, found in sweep.plans(budgets if budgets else range(1, limit + 1)):
        passed_any = False
        for checked in found.checked:
            plan = replace(found.plan, followers=checked["followers"], head_map=_maps_for(checked, table, found.plan),
                           follower_costs=None, index_costs={}, damage=None)
            passed_any |= _add(rows, proposed, "measured damage", plan, checked["measured"], tolerance, checked["predicted"])
        for plan in _variants(planner.plan_spans(report, budget=budget, cost=cost, stability_resamples=0,
                                                 **constraints.as_kwargs()), constraints.align_heads):
            key = _plan_key(plan)
            if key not in proposed:
                measured = meter.timed(f"similarity plan {plan.spans_spec()}", lambda: run.damage(plan.anchor_of, plan.head_map, mode))
                passed_any |= _add(rows, proposed, "similarity", plan, measured.summary(), tolerance, None)
        if stop_early and not passed_any:
            break
    rows = _singles(table, report.n_layers, tolerance) + rows
    best_row = _choose(rows)
    best_plan = None if best_row is None else _chosen_plan(best_row, proposed[best_row.key], loaded.info, table)
    validation = None
    if best_plan is not None:
        say(f"validating {best_plan.spans_spec()} on held-out text")
        validation = validate_plan(loaded, best_plan, heldout, mode=mode, tolerance=tolerance, tasks=tasks,
                                   measure_speed=measure_speed, batch_size=batch_size)
    sensitivity = {m: table.value(m, a, table.way_for(m, a, constraints.align_heads))
                   for (m, a, way) in table.pairs if a == m - 1 and way == "index"}
    return PlanSearch(tolerance=float(tolerance), mode=mode, rows=rows, sensitivity=sensitivity,
                      best=None if best_plan is None else best_plan.to_dict(), validation=validation,
                      meta={"calibration": describe_batch(calibration), "heldout": describe_batch(heldout), "cost": cost,
                            "constraints": constraints.as_kwargs(), "budgets": list(budgets) if budgets else None,
                            "damage": table.to_dict()})


def _maps_for(checked: Mapping[str, Any], table: DamageTable, plan: Any) -> dict[int, list[int]]:
    """The head maps of a checked plan's aligned followers (the measured pair's map)."""
    from ..planner import anchors_for

    anchor_of = anchors_for(checked["followers"], plan.n_layers)
    return {m: list(table.maps[(m, anchor_of[m])]) for m in checked["aligned"]}


def _add(rows: list[MeasuredPlan], proposed: dict, method: str, plan: Any, measured: Summary,
         tolerance: float, predicted: Mapping[str, Any] | None) -> bool:
    """Record a measured candidate once (a plan found again adds its method); returns whether it passes."""
    key = _plan_key(plan)
    for row in rows:
        if row.key == key:
            if method not in row.methods:
                row.methods.append(method)
            return row.passed
    row = MeasuredPlan.of("candidate", method, plan, measured, tolerance, predicted)
    rows.append(row)
    proposed[key] = plan
    return row.passed


def _singles(table: DamageTable, n_layers: int, tolerance: float) -> list[MeasuredPlan]:
    """One row per measured single follower with the layer before it as anchor (index and head-aligned)."""
    from ..planner import SharePlan

    rows = []
    for (m, a, way), values in sorted(table.pairs.items()):
        if a != m - 1:
            continue
        heads = {m: table.maps[(m, a)]} if way == "aligned" else {}
        plan = SharePlan(n_layers, [m], head_map=heads)
        rows.append(MeasuredPlan.of("sensitivity", "single layer" + (", aligned" if heads else ""), plan,
                                    Damage(**values).summary(), tolerance, None))
    return rows


def _variants(plan: Any, align: str) -> list[Any]:
    """The plan, and under auto the same followers by index where it maps heads: both are measured."""
    if align != "auto" or not plan.head_map:
        return [plan]
    return [plan, replace(plan, head_map={}, index_costs={}, follower_costs=None)]  # its planner cost is not the plan's


def _plan_key(plan: Any) -> tuple:
    return tuple(plan.followers), tuple(sorted(plan.head_map))


def _chosen_plan(row: MeasuredPlan, proposed: Any, info: ModelInfo, table: DamageTable):
    """The chosen plan as measured (its head maps included), for this model's shape, with its damage on calibration
    text as the prediction `validate` prints next to its held-out measurement."""
    damage = PlanDamage.of_checked({"measured": row.measured, "predicted": row.predicted}, table.n_tokens, table.n_seqs, table.baseline_nll, SEARCH_BASIS)
    return replace(proposed, model={**proposed.model, **info.shape()}, damage=damage,
                   method="validated: " + ", ".join(row.methods), stability=None)


def _choose(rows: Sequence[MeasuredPlan]) -> MeasuredPlan | None:
    """The passing row with the most layers shared, then the least next-token KL.

    KL, not the perplexity change, ranks plans that pass: on a few thousand calibration tokens the perplexity change
    is noisy (it often comes out negative) and choosing its minimum picks noise; KL(baseline || patched) is a
    lower-variance measure of how far the patched model moved (on SmolLM2-135M it picked the better plan on held-out text).
    """
    passing = [r for r in rows if r.passed and r.n_shared > 0]
    if not passing:
        return None
    return min(passing, key=lambda r: (-r.n_shared, r.kl_mean, r.ppl_change))


def describe_batch(batch: Any) -> dict[str, Any]:
    return batch.describe() if hasattr(batch, "describe") else {"shape": list(token_ids(batch).shape)}
