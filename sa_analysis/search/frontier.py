"""The sharing frontier: for each number of shared layers, the recommended plan, what it is predicted to cost, what it
costs on held-out text, and what it saves; the curve that decides how many layers to share.

The budgets are walked by the one budget sweep (`search.sweep`: one `PrefixRun` of the calibration tokens and one
`DamageTable` serve every budget). Each plan is measured on the held-out tokens by the one held-out measurement
(`damage.heldout`, as `validate` and `heal` measure), against the untouched model recorded once on them. The state (the table and the points done)
can be written after every measurement, so a run that is stopped resumes without measuring anything twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch

from ..artefact import JsonArtefact, Record
from ..damage.heldout import HeldOut, Untouched, measure_heldout
from ..damage.table import DamageTable
from ..planner import PlanConstraints, SharePlan
from ..progress import Say
from ..planner.record import Summary
from .baselines import JudgedBaseline, baseline_plans, judge_baselines
from .sweep import BudgetSweep

if TYPE_CHECKING:
    from ..data import Tokens
    from ..loading import LoadedModel
    from ..report import AttentionReport



@dataclass
class HealedText(Record):
    """A budget's plan after healing, on one held-out text: perplexities, the heal report's three yardsticks (`gaps`:
    nats per token, 95 % paired intervals where measured) and faithfulness (KL and top-1 agreement with the untouched
    model). None where not measured (no control: `control`, `change`, `after`, ...)."""

    baseline: float  # the untouched model's perplexity
    patched: float  # shared, before healing
    healed: float
    change_untouched: float  # healed / baseline - 1
    before: float  # NLL gap to the untouched model before healing
    after_untouched: float  # ... after healing
    control: float | None = None  # the control's perplexity (the same fine-tune without sharing)
    change: float | None = None  # healed / control - 1
    after: float | None = None  # NLL gap to the control after healing
    fine_tuning: float | None = None  # what the fine-tune alone did (baseline against control)
    closed: float | None = None  # the share of the gap healing closed
    before_low: float | None = None
    before_high: float | None = None
    after_untouched_low: float | None = None
    after_untouched_high: float | None = None
    after_low: float | None = None
    after_high: float | None = None
    kl_before: float | None = None
    kl_after: float | None = None
    kl_control: float | None = None
    top1_before: float | None = None
    top1_after: float | None = None
    top1_control: float | None = None

    @classmethod
    def of(cls, perplexity: Mapping[str, float], gaps: Mapping[str, float | None]) -> "HealedText":
        """From a heal report's perplexities of one text ({"baseline", "patched", "healed", "control"?}) and gaps."""
        control = perplexity.get("control")
        return cls(**perplexity, **gaps, change=None if control is None else perplexity["healed"] / control - 1,
                   change_untouched=perplexity["healed"] / perplexity["baseline"] - 1)

    def to_dict(self) -> dict[str, Any]:
        """The fields, less the control and the interval bounds where they were not measured (as earlier files)."""
        return {k: v for k, v in self.__dict__.items() if v is not None or not (k == "control" or k.endswith(("_low", "_high")))}


@dataclass
class FrontierPoint(Record):
    """One budget of the frontier: the plan, its prediction (the whole plan measured on calibration tokens), its
    held-out measurement, its savings; after a heal, each held-out text healed; with --baselines, the baselines."""

    budget: int
    plan: dict[str, Any]  # SharePlan.to_dict() (its damage record included)
    predicted: Summary  # kl, nll_change with 95 % intervals, top1, calibration tokens
    heldout: Summary  # kl, nll_change with 95 % intervals, top1, perplexity (+ low/high), held-out tokens
    savings: dict[str, Any]
    measurements: int  # measurements this run had made when the point was done (a resumed run counts from 0)
    seconds: float
    healed: dict[str, HealedText] | None = None  # {held-out text: the healed plan on it}
    healed_run: dict[str, Any] | None = None  # the heal's trainable parameters, seconds, first and last loss
    baselines: dict[str, JudgedBaseline] | None = None  # {method: the baseline of this budget} (--baselines)

    RECORDS: ClassVar[dict[str, type]] = {"predicted": Summary, "heldout": Summary}
    RECORD_MAPS: ClassVar[dict[str, type]] = {"healed": HealedText, "baselines": JudgedBaseline}


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


def heldout_summary(model: torch.nn.Module, held: Untouched, plan: SharePlan) -> Summary:
    """The plan measured whole on held-out tokens (`damage.heldout`, the one held-out measurement): KL and NLL change
    with intervals, top-1 agreement, perplexity (with the interval of its NLL change)."""
    return measure_heldout(model, held, plan).summary()


def measure_frontier(loaded: "LoadedModel", report: "AttentionReport", calibration: Tokens, heldout: Tokens,
                     budgets: Iterable[int], *, constraints: PlanConstraints = PlanConstraints(),
                     state: FrontierState | None = None, baselines: Sequence[str] = (), progress: Say | None = None,
                     on_measured: Callable[[FrontierState], None] | None = None) -> tuple[FrontierState, HeldOut]:
    """The recommended plan at each budget (ascending, `BudgetSweep`), measured on held-out text; returns (state, the
    untouched model on the held-out tokens).

    `calibration` / `heldout`: token batches (or ids [S, T]); `state`: what an earlier run measured (its points are
    kept, its table reused); `baselines`: methods of `search.baselines.BASELINES` chosen on the same calibration tokens
    and judged beside each budget's plan on the same held-out tokens; `on_measured(state)` after every measurement and
    every point (to save it).
    """
    budgets = sorted(set(int(b) for b in budgets))
    sweep = BudgetSweep.start(loaded, report, calibration, constraints=constraints,
                              table=state.table if state else None, progress=progress)
    held = Untouched.record(loaded.model, heldout)
    state = state or FrontierState(sweep.table)
    if on_measured is not None:
        sweep.meter.after = lambda: on_measured(state)
    started = time.perf_counter()
    for budget, search in sweep.plans(b for b in budgets if b not in state.points):
        plan = search.plan
        plan.constraints.setdefault("budget", budget)
        state.points[budget] = FrontierPoint(
            budget=budget, plan=plan.to_dict(), predicted=plan.damage.plan,
            heldout=heldout_summary(loaded.model, held, plan), savings=plan.savings(), measurements=sweep.meter.count,
            seconds=round(time.perf_counter() - started, 1))
        if on_measured is not None:
            on_measured(state)
    if baselines:
        _judge_baselines(loaded, sweep, held, state, budgets, baselines, on_measured)
    return state, measure_heldout(None, held)


def _judge_baselines(loaded: "LoadedModel", sweep: BudgetSweep, held: Untouched, state: FrontierState,
                     budgets: list[int], names: Sequence[str], on_measured: Callable | None) -> None:
    """The baselines of every budget asked that has none yet, judged beside its recommended plan."""
    todo = sorted(b for b in set(budgets) if state.points[b].baselines is None)
    if not todo:
        return
    sweep.meter.say(f"baselines ({', '.join(names)}) at {len(todo)} budget(s)")
    plans = baseline_plans(sweep.run, todo, names, first_shareable=sweep.constraints.first_shareable,
                           model=loaded.info.shape(), progress=sweep.meter.say)
    for budget in todo:
        point = state.points[budget]
        point.baselines = judge_baselines(loaded.model, sweep.run, held, SharePlan.from_dict(point.plan), plans[budget])
        if on_measured is not None:
            on_measured(state)


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
                                  lambda p: p.heldout.perplexity / self.baseline["perplexity"] - 1)
        found: dict[str, Any] = {"before": before}
        healed = [p for p in self.points if p.healed]
        texts = sorted({name for p in healed for name in p.healed})
        for key, change in (("after", "change"), ("after_untouched", "change_untouched")):
            found[key] = {name: within_tolerance(healed, self.tolerance,
                                                 lambda p, n=name, c=change: getattr(p.healed[n], c) if n in p.healed else None)
                          for name in texts}
        bound = self.kl_bound(before, texts)
        found["kl_bound"] = bound
        faithful = [p.budget for p in healed if bound and all(
            n in p.healed and p.healed[n].change_untouched <= self.tolerance
            and p.healed[n].kl_after is not None and p.healed[n].kl_after <= bound[n] for n in texts)]
        found["faithful"] = max(faithful) if faithful else None
        return found

    def kl_bound(self, before: int | None, texts: list[str]) -> dict[str, float] | None:
        """{text: KL} no healed plan may exceed to count as faithful: the next-token KL to the untouched model of the
        largest budget within the tolerance before healing, before healing (measured on that text when that budget was
        healed, else on the frontier's held-out tokens); None when no budget is within the tolerance."""
        point = next((p for p in self.points if p.budget == before), None)
        if point is None or not texts:
            return None
        if point.healed and all(n in point.healed and point.healed[n].kl_before is not None for n in texts):
            return {n: float(point.healed[n].kl_before) for n in texts}
        return {n: float(point.heldout.kl) for n in texts}
