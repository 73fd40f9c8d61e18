"""The plan job: a report (saved, or measured now) -> the optimal SharePlan, its baselines, plan.json and plan.png.

With a model at hand (the default when the report is measured now) the plan is chosen by measured output damage
(`damage.measure`: each follower's next-token KL on calibration tokens, interactions checked on whole plans);
from a saved report alone it is chosen by attention similarity, the weaker predictor, and says so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import defaults
from ..damage.measure import DamageSearch, measure_similarity_plans, plan_from_damage
from ..loading import LoadedModel
from ..planner import PlanConstraints, SharePlan, compare_plans, evaluate_plan, plan_spans
from ..prechecks import check_plan_options
from ..report import AttentionReport
from .heatmap import check_report_inputs, report_or_measure
from .inputs import Bar, CaptureSpec, ModelSpec, Say, Status, TextSpec

SIMILARITY_NOTE = ("chosen by attention similarity alone (summed head-mean KL), which ranks the measured perplexity of "
                   "spans poorly (Spearman about 0.6 on the default model, BENCHMARKS.md); with the model at hand, "
                   "--predict output measures each follower's damage to the model's output instead")


@dataclass
class PlanResult:
    """What `run_plan` made: the report it planned from, the plan, the baselines, the output folder and files."""

    report: AttentionReport
    plan: SharePlan
    alternatives: dict[str, Any]
    out: Path
    files: list[Path]
    source: ModelSpec  # the model to measure the plan on (the report's own, unless a model was given)
    loaded: LoadedModel | None = None  # the model, when the plan was measured on it (a search reuses it)
    damage: DamageSearch | None = None  # when the plan was chosen by measured damage


def run_plan(report: str | Path | None, source: ModelSpec | None, text: TextSpec = TextSpec(seq_len=None),
             capture: CaptureSpec = CaptureSpec(), *, budget: str | None = None, max_cost: float | None = None,
             cost: str = "kl", constraints: PlanConstraints = PlanConstraints(), context_len: int | None = None,
             out: Path | None = None, predict: str = "auto", progress: Bar | None = None, status: Status | None = None,
             notice: Say | None = None, say: Say | None = None) -> PlanResult:
    """Plan from a saved report or a fresh capture of `source` on `text`: the least-cost plan under the budget (or
    cost cap), the baselines with the same number of shared layers (measured whole too, when the plan was chosen by
    measured damage), and plan.json + plan.png under the output folder.

    `predict`: "output" chooses by measured output damage (loading the model when only a report was given),
    "similarity" by the report's attention cost alone, "auto" by output damage whenever the model is loaded anyway
    (no `report`). `say(message)` hears of each damage measurement; `progress`, `status`, `notice` as `run_heatmap`."""
    from ..planner import DEFAULT_CONTEXT_LEN
    from ..plots import heatmap_metric_for, plot_plan_over_heatmap

    parsed_budget = check_plan_options(budget, max_cost, cost, predict)
    check_report_inputs(report, source, text)
    att, out_dir, placed, loaded = report_or_measure(report, source, text, capture, out, progress, status, notice)
    damage = None
    if predict == "output" or (predict == "auto" and loaded is not None):
        loaded = loaded or placed.load(status)
        damage = measure_damage_plan(loaded, att, parsed_budget, max_cost, constraints, text.text, say)
        plan = damage.plan
    else:
        plan = plan_spans(att, budget=parsed_budget, max_cost=max_cost, cost=cost, **constraints.as_kwargs())
        plan.notes.append(SIMILARITY_NOTE)
    plan.context_len = context_len or DEFAULT_CONTEXT_LEN
    priced = evaluate_plan(plan, att, cost) if damage is not None else plan  # the baselines' units: attention cost
    alternatives = compare_plans(att, priced, cost=cost, first_shareable=constraints.first_shareable,
                                 keep=list(constraints.keep), max_span=plan.constraints.get("max_span"))
    if damage is not None:
        measure_similarity_plans(damage, alternatives)  # the baselines in output units, into plan.damage.baselines
        damage.run = None  # the recorded layer inputs are not needed any more
    figure = out_dir / "plan.png"
    files = [plan.save(out_dir / "plan.json")]
    plot_plan_over_heatmap(att, plan, heatmap_metric_for(att, cost), figure)
    return PlanResult(att, plan, alternatives, out_dir, files + [figure], placed, loaded, damage)


def measure_damage_plan(loaded: LoadedModel, report: AttentionReport, budget: Any, max_cost: float | None,
                        constraints: PlanConstraints, text: Any = None, progress: Say | None = None) -> DamageSearch:
    """The plan of least measured output damage (`damage.measure.plan_from_damage`) on calibration tokens of the
    report's length."""
    batch = TextSpec(text, seq_len=report.seq_len or defaults.SEQ_LEN).damage_batch(loaded)
    return plan_from_damage(loaded, report, batch, budget=budget, max_cost=max_cost, constraints=constraints,
                            progress=progress)
