"""Validate: prove a Shared Attention plan by measurement, baseline vs patched, in one `ValidationReport`.

Quality on held-out text (never the calibration text the plan was chosen on): perplexity and its relative change,
next-token KL(baseline || patched), top-1 agreement, and a pass/fail against a tolerance on the relative
perplexity increase (`quality`). Optionally lm-evaluation-harness tasks (`tasks`: `HFLM` wrapping the patched model
object; local task files, offline). Efficiency, measured (`speed`): prefill and decode tokens/s, peak memory and
KV-cache bytes. `run.validate_plan` puts them together into a `report.ValidationReport`.

Quality is measured by the project's one held-out measurement (`damage.heldout`), as the frontier and `heal` measure.
Searching for plans across budgets lives in `search` (it calls `validate_plan` on the plan it chooses).
"""

from .plans import as_plan, check_plan_for_model, predicted_savings
from .quality import measure_quality, untouched
from .report import DEFAULT_TOLERANCE, ValidationReport
from .run import validate_plan
from .speed import compare_speed, measure_speed
from .tasks import check_tasks, compare_tasks, run_tasks

__all__ = [
    "DEFAULT_TOLERANCE", "ValidationReport", "as_plan", "check_plan_for_model", "check_tasks", "compare_speed", "compare_tasks",
    "measure_quality", "measure_speed", "predicted_savings", "run_tasks", "untouched", "validate_plan",
]
