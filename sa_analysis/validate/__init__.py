"""Validate: prove a Shared Attention plan by measurement, baseline vs patched, in one `ValidationReport`.

Quality on held-out text (never the calibration text the plan was chosen on): perplexity and its relative change,
next-token KL(baseline || patched), top-1 agreement, and a pass/fail against a tolerance on the relative
perplexity increase (`quality`). Optionally lm-evaluation-harness tasks (`tasks`: `HFLM` wrapping the patched model
object; local task files, offline). Efficiency, measured (`speed`): prefill and decode tokens/s, peak memory and
KV-cache bytes. `run.validate_plan` puts them together into a `report.ValidationReport`.

`search.search_plans` closes the loop of docs/DESIGN.md section 4 on the plans of least measured damage (the `damage`
package): for each budget it measures the damage-optimal plan and its neighbours whole, and returns the best plan
within the tolerance, proved on held-out text, with a table of everything tried. `frontier` does the same across
budgets: the plan at each, its held-out damage, its savings.
"""

from .plans import as_plan, check_plan_for_model, predicted_savings
from .quality import Baseline, baseline, measure_quality
from .report import DEFAULT_TOLERANCE, ValidationReport
from .run import validate_plan
from .frontier import Frontier, FrontierPoint, FrontierState, measure_frontier
from .search import PlanSearch, search_plans
from .speed import compare_speed, measure_speed
from .tasks import check_tasks, compare_tasks, run_tasks

__all__ = [
    "DEFAULT_TOLERANCE", "Baseline", "Frontier", "FrontierPoint", "FrontierState", "measure_frontier", "PlanSearch",
    "ValidationReport", "as_plan", "baseline", "check_plan_for_model", "check_tasks", "compare_speed", "compare_tasks",
    "measure_quality", "measure_speed", "predicted_savings", "run_tasks", "search_plans", "validate_plan",
]
