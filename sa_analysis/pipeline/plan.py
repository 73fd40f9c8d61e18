"""The plan job: a report (saved, or measured now) -> the optimal SharePlan, its baselines, plan.json and plan.png."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io import default_out_dir, ensure_writable_dir
from ..planner import COSTS, PlanConstraints, SharePlan, compare_plans, parse_budget, plan_spans
from ..report import AttentionReport, check_report_model
from .heatmap import run_heatmap


@dataclass
class PlanResult:
    """What `run_plan` made: the report it planned from, the plan, the baselines, the output folder and files."""

    report: AttentionReport
    plan: SharePlan
    alternatives: dict[str, Any]
    out: Path
    files: list[Path]
    model_spec: str  # the model to measure the plan on (the report's own, unless --model was given)


def check_plan_options(budget: str | None, max_cost: float | None, cost: str) -> int | float | None:
    """The parsed budget, after the checks that need no model (a typo is answered before anything loads)."""
    parsed = parse_budget(budget) if budget is not None else None
    if parsed is not None and max_cost is not None:
        raise UserError("Give either --budget or --max-cost, not both; the max cost already decides how many layers to share.")
    if cost not in COSTS:
        raise UserError(f"Unknown --cost {cost!r}; choose one of {', '.join(COSTS)}.")
    return parsed


def report_for_plan(report: str | Path | None, model: str | None, out: Path | None, **capture: Any
                    ) -> tuple[AttentionReport, Path, str]:
    """(report, output folder, model spec): load `report` (checking `model` against it) or measure `model` now."""
    if report is not None:
        att = AttentionReport.load(report)
        check_report_model(att, model)
        spec = model or att.meta.get("model", {}).get("spec") or att.model_name
        return att, ensure_writable_dir(default_out_dir(out, att.model_name)), spec
    out_dir = ensure_writable_dir(default_out_dir(out, model))
    att, _paths = run_heatmap(model, out=out_dir, **capture)
    return att, out_dir, model


def run_plan(report: str | Path | None, model: str | None, *, budget: str | None = None,
             max_cost: float | None = None, cost: str = "kl", constraints: PlanConstraints = PlanConstraints(),
             context_len: int | None = None, out: Path | None = None, **capture: Any) -> PlanResult:
    """Plan from a saved report or a fresh capture: the least-cost plan under the budget (or cost cap), the baselines
    with the same number of shared layers, and plan.json + plan.png under the output folder."""
    from ..planner import DEFAULT_CONTEXT_LEN
    from ..plots import heatmap_metric_for, plot_plan_over_heatmap

    parsed_budget = check_plan_options(budget, max_cost, cost)
    att, out_dir, spec = report_for_plan(report, model, out, **capture)
    plan = plan_spans(att, budget=parsed_budget, max_cost=max_cost, cost=cost, **constraints.as_kwargs())
    plan.context_len = context_len or DEFAULT_CONTEXT_LEN
    alternatives = compare_plans(att, plan, cost=cost, first_shareable=constraints.first_shareable,
                                 keep=list(constraints.keep), max_span=plan.constraints.get("max_span"))
    figure = out_dir / "plan.png"
    files = [plan.save(out_dir / "plan.json")]
    plot_plan_over_heatmap(att, plan, heatmap_metric_for(att, cost), figure)
    return PlanResult(att, plan, alternatives, out_dir, files + [figure], spec)
