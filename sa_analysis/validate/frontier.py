"""The sharing frontier: for each number of shared layers, the recommended plan, what it is predicted to cost, what it
costs on held-out text, and what it saves; the curve that decides how many layers to share.

One `PrefixRun` of the calibration tokens and one `DamageTable` serve every budget, so a pair or a span measured
for one budget is not measured again for the next (the frontier costs little more than its largest budget alone).
The held-out tokens have a `PrefixRun` of their own: each plan's held-out damage is measured from its lowest anchor
on, and its perplexity is `exp(baseline NLL + NLL change)` on those tokens. The state (the table and the points done)
can be written after every measurement, so a run that is stopped resumes without measuring anything twice.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping

from ..artefact import JsonArtefact
from ..damage.measure import Meter, plan_from_damage
from ..damage.prefix import PrefixRun
from ..damage.record import Damage
from ..damage.table import DamageTable
from ..planner import PlanConstraints, SharePlan
from ..progress import Say



@dataclass
class FrontierPoint:
    """One budget of the frontier: the plan, its prediction (the whole plan measured on calibration tokens), its
    held-out measurement, its savings; after a heal, the healed perplexity on each held-out text."""

    budget: int
    plan: dict[str, Any]  # SharePlan.to_dict() (its damage record included)
    predicted: dict[str, float]  # kl, nll_change with 95 % intervals, calibration tokens
    heldout: dict[str, float]  # kl, nll_change with 95 % intervals, top1, perplexity (+ low/high), held-out tokens
    savings: dict[str, Any]
    measurements: int  # measurements this run had made when the point was done (a resumed run counts from 0)
    seconds: float
    healed: dict[str, dict[str, float]] | None = None  # {text: {"baseline", "patched", "healed", "control", "change",
    #   "change_untouched", the heal report's gaps: "before", "after", "after_untouched", "kl_before", "kl_after", ...}}
    healed_run: dict[str, Any] | None = None  # the heal's trainable parameters, seconds, first and last loss

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FrontierPoint":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass
class FrontierState:
    """What a frontier run has measured so far: the damage table and the points done (saved to resume from)."""

    table: DamageTable
    points: dict[int, FrontierPoint] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table.to_dict(), "points": [p.to_dict() for _, p in sorted(self.points.items())]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FrontierState":
        points = [FrontierPoint.from_dict(p) for p in data.get("points", [])]
        return cls(DamageTable.from_dict(data["table"]), {p.budget: p for p in points})


def heldout_summary(held: PrefixRun, plan: SharePlan) -> dict[str, float]:
    """The plan measured whole on held-out tokens: KL and NLL change with intervals, top-1 agreement, perplexity
    (with the interval of its NLL change)."""
    return summary_with_perplexity(held, held.damage(plan.anchor_of, plan.head_map))


def summary_with_perplexity(held: PrefixRun, measured: Damage) -> dict[str, float]:
    """`measured.summary()` (a plan's damage on `held`'s tokens) with the perplexity it means, and its interval."""
    summary = measured.summary()
    for suffix in ("", "_low", "_high"):
        summary[f"perplexity{suffix}"] = math.exp(held.baseline_nll + summary[f"nll_change{suffix}"])
    return summary


def measure_frontier(loaded: Any, report: Any, calibration: Any, heldout: Any, budgets: Iterable[int], *,
                     constraints: PlanConstraints = PlanConstraints(), state: FrontierState | None = None,
                     progress: Say | None = None, on_measured: Callable[[FrontierState], None] | None = None,
                     ) -> tuple[FrontierState, PrefixRun]:
    """The recommended plan at each budget (ascending), measured on held-out text; returns (state, held-out run).

    `calibration` / `heldout`: token batches (or ids [S, T]); `state`: what an earlier run measured (its points are
    kept, its table reused); `on_measured(state)` after every measurement and every point (to save it).
    """
    say = progress or (lambda _m: None)
    budgets = sorted(set(int(b) for b in budgets))
    run = PrefixRun.record(loaded.model, calibration)
    held = PrefixRun.record(loaded.model, heldout)
    state = state or FrontierState(DamageTable(report.n_layers, run.n_seqs, run.n_tokens, run.baseline_nll))
    meter = Meter(say)
    if on_measured is not None:
        meter.after = lambda: on_measured(state)
    started, todo = time.perf_counter(), [b for b in budgets if b not in state.points]
    for i, budget in enumerate(todo):
        say(f"budget {budget} ({i + 1} of {len(todo)}){_time_left(meter, todo[i:])}")
        search = plan_from_damage(loaded, report, run, budget=budget, constraints=constraints, table=state.table,
                                  meter=meter)
        plan = search.plan
        plan.constraints.setdefault("budget", budget)
        state.points[budget] = FrontierPoint(
            budget=budget, plan=plan.to_dict(), predicted=dict(plan.damage.plan),
            heldout=heldout_summary(held, plan), savings=plan.savings(), measurements=meter.count,
            seconds=round(time.perf_counter() - started, 1))
        if on_measured is not None:
            on_measured(state)
    return state, held


def _time_left(meter: Meter, budgets: list[int]) -> str:
    """An estimate of the time left once the shared pair measurements are made: each budget left costs about its
    size plus two whole measurements (its plan and neighbours checked whole, a span or two re-measured)."""
    if not meter.count:
        return ""
    per = meter.seconds / meter.count
    return f", about {per * sum(b + 2 for b in budgets):.0f} s of measurements left"


def within_tolerance(points: Iterable[FrontierPoint], tolerance: float, key: Callable[[FrontierPoint], float | None]
                     ) -> int | None:
    """The largest budget whose relative perplexity change (`key`) stays within `tolerance`, None if none does."""
    passing = [p.budget for p in points if (value := key(p)) is not None and value <= tolerance]
    return max(passing) if passing else None


FRONTIER_FORMAT = "sa-analysis/sharing-frontier"


@dataclass
class Frontier(JsonArtefact):
    """The sharing frontier of one model: a point per budget, the unshared baseline, the largest budget within the
    tolerance before healing (held-out perplexity against the untouched model) and after it (healed against the
    control, per held-out text), and what the measurements rested on."""

    FORMAT: ClassVar[str] = FRONTIER_FORMAT
    WHAT: ClassVar[str] = "sharing frontier"
    FILE: ClassVar[str] = "frontier.json"
    MADE_BY: ClassVar[str] = "`sa-analyze frontier`"

    model: dict[str, Any]
    points: list[FrontierPoint]
    baseline: dict[str, float]  # unshared model on the held-out tokens: nll, perplexity
    tolerance: float
    calibration: dict[str, Any]  # the tokens predictions rest on (described)
    heldout: dict[str, Any]  # the tokens measurements rest on (described)
    heal: dict[str, Any] | None = None  # recipe, control, the held-out texts healed plans are judged on
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["points"] = [p.to_dict() for p in self.points]
        data["within"] = self.within()
        return data

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], source: str) -> "Frontier":
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["points"] = [FrontierPoint.from_dict(p) for p in data["points"]]
        return cls(**fields)

    def within(self) -> dict[str, Any]:
        """The largest budget within the tolerance: measured before healing (against the untouched model), and after it
        on each healed text against the control (`after`) and against the untouched model (`after_untouched`); and
        the faithful reach (`faithful`): the largest healed budget within the tolerance of the untouched model on every
        healed text whose next-token KL to the untouched model is no larger than the largest budget within the
        tolerance before healing had before healing (`kl_bound`, per text)."""
        before = within_tolerance(self.points, self.tolerance,
                                  lambda p: p.heldout["perplexity"] / self.baseline["perplexity"] - 1)
        found: dict[str, Any] = {"before": before}
        healed = [p for p in self.points if p.healed]
        texts = sorted({name for p in healed for name in p.healed})
        for key, change in (("after", "change"), ("after_untouched", "change_untouched")):
            found[key] = {name: within_tolerance(healed, self.tolerance,
                                                 lambda p, n=name, c=change: p.healed[n].get(c) if n in p.healed else None)
                          for name in texts}
        bound = self.kl_bound(before, texts)
        found["kl_bound"] = bound
        faithful = [p.budget for p in healed if bound and all(
            n in p.healed and (p.healed[n].get("change_untouched") is not None)
            and p.healed[n]["change_untouched"] <= self.tolerance
            and p.healed[n].get("kl_after") is not None and p.healed[n]["kl_after"] <= bound[n] for n in texts)]
        found["faithful"] = max(faithful) if faithful else None
        return found

    def kl_bound(self, before: int | None, texts: list[str]) -> dict[str, float] | None:
        """{text: KL} no healed plan may exceed to count as faithful: the next-token KL to the untouched model of the
        largest budget within the tolerance before healing, before healing (measured on that text when that budget was
        healed, else on the frontier's held-out tokens); None when no budget is within the tolerance."""
        point = next((p for p in self.points if p.budget == before), None)
        if point is None or not texts:
            return None
        if point.healed and all(point.healed.get(n, {}).get("kl_before") is not None for n in texts):
            return {n: float(point.healed[n]["kl_before"]) for n in texts}
        kl = point.heldout.get("kl")
        return None if kl is None else {n: float(kl) for n in texts}
