"""The validation jobs: one plan proved on held-out text (`run_validate`), and plan -> measure -> re-plan
(`run_search`, what `recommend-spans --validate` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import defaults
from ..errors import UserError
from ..io import default_out_dir
from ..loading import LoadedModel
from ..patch import check_mode
from ..planner import PlanConstraints, SharePlan
from ..prechecks import check_before_loading
from ..search import PlanSearch, search_plans
from ..validate import ValidationReport, check_plan_for_model, check_tasks, validate_plan
from .inputs import ModelSpec, Status, TextSpec, status_of

if TYPE_CHECKING:
    from ..report import AttentionReport


def check_validate_options(plan_file: str | Path | None, spans: str | None, mode: str, tasks: Sequence[str],
                           status: Status | None = None) -> None:
    """The option checks that need no model: one plan source at most, a known mode, known tasks."""
    if plan_file is not None and spans is not None:
        raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
    check_mode(mode)
    if tasks:
        with status_of(status, "checking the task names"):
            check_tasks(tasks)


def plan_for_model(loaded: LoadedModel, plan: SharePlan | None, spans: str | None) -> SharePlan:
    """The plan to validate on `loaded`: the given plan (checked against the model), the spans, or the plan a folder
    exported by `heal` carries."""
    info = loaded.info
    if plan is None and spans is None:
        saved = info.extra.get("shared", {}).get("plan")
        if saved is None:
            raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
        plan = SharePlan.from_dict(saved)
        plan.model["name"] = info.name  # the folder's own plan: it was exported with these weights
    if plan is None:
        return SharePlan.from_spans(spans, info.n_layers, model=info.shape())
    check_plan_for_model(plan, info)
    return plan


def run_validate(source: ModelSpec, text: TextSpec, *, plan_file: str | Path | None = None, spans: str | None = None,
                 mode: str = "fast", tolerance: float = defaults.TOLERANCE, tasks: Sequence[str] = (),
                 task_limit: int | None = None, measure_speed: bool = True,
                 decode_tokens: int = defaults.DECODE_TOKENS, out: Path | None = None,
                 status: Status | None = None, on_start: Callable[[SharePlan, Any], None] | None = None
                 ) -> tuple[ValidationReport, Path]:
    """Baseline vs patched on held-out text; writes validation.json under `out`. Returns (report, its path).

    `on_start(plan, batch)` is called once the plan and the text are known (the CLI prints what it validates).
    """
    check_validate_options(plan_file, spans, mode, tasks, status)
    out_dir = default_out_dir(out, source.model)
    plan = check_before_loading(source.model, out=out_dir, text=text.text, seq_len=text.seq_len, spans=spans,
                                plan_file=plan_file)
    loaded = source.load(status).without_sharing()  # the baseline: the same weights without sharing
    share_plan = plan_for_model(loaded, plan, spans)  # (a healed folder's plan stays recorded in its info)
    batch = text.batch(loaded, "heldout")
    if on_start:
        on_start(share_plan, batch)
    with status_of(status, "measuring baseline and patched"):
        report = validate_plan(loaded, share_plan, batch, mode=mode, tolerance=tolerance, tasks=list(tasks),
                               task_limit=task_limit, measure_speed=measure_speed, speed_new_tokens=decode_tokens)
    return report, report.save(out_dir / "validation.json")


def run_search(report: AttentionReport, source: ModelSpec, text: TextSpec, *, out: Path, max_budget: int,
               tolerance: float = defaults.TOLERANCE, mode: str = "fast", cost: str = "kl",
               constraints: PlanConstraints = PlanConstraints(), status: Status | None = None,
               progress: Callable[[str], None] | None = None, loaded: LoadedModel | None = None,
               damage: Any = None) -> tuple[PlanSearch, list[Path]]:
    """Plan -> measure -> re-plan on the calibration text, then the best plan checked on held-out text.

    Tries budgets 1..`max_budget` (stopping at the first with nothing within `tolerance`); writes search.json,
    search.png and, when a plan passes, plan_validated.json and validation.json. Returns (search, paths).
    `progress(message)` hears of every plan measured.
    """
    from ..plots import plot_search

    if max_budget < 1:
        raise UserError("--validate needs a plan that shares at least one layer; raise --budget or --max-cost.")
    loaded = loaded or source.load(status)
    calibration = text.damage_batch(loaded)
    search = search_plans(loaded, report, calibration, text.batch(loaded, "heldout"), budgets=range(1, max_budget + 1),
                          tolerance=tolerance, mode=mode, cost=cost, constraints=constraints, progress=progress,
                          table=None if damage is None else damage.table)
    paths = [search.save(out / "search.json"), plot_search(search, out / "search.png")]
    if search.best_plan is not None:
        paths.append(search.best_plan.save(out / "plan_validated.json"))
        paths.append(search.validation.save(out / "validation.json"))
    return search, paths
