"""The jobs end to end, the only entry points the CLI and the notebooks call: `run_heatmap` (measure and draw),
`run_plan` (choose spans), `run_heads` (head families), `run_compare` (checkpoints side by side), `run_validate` (prove one plan), `run_search` (plan -> measure -> re-plan), `run_frontier` (the plan at every budget,
measured, healed against a control), `run_heal`
(fine-tune with sharing and export). Each step lives in its own package; these modules only wire them. Every job
takes the same typed inputs (`inputs`): the model (`ModelSpec`), the text (`TextSpec`), and, where it measures an
attention report, how (`CaptureSpec`).
"""

from .compare import CompareResult, run_compare
from .frontier import FrontierResult, run_frontier
from .heal import YARDSTICKS, HealConfig, HealStart, run_heal
from .heads import HeadsResult, run_heads
from ..analysis import analyse, build_report, choose_path, preflight, sequence_stats
from .heatmap import redraw_heatmap, run_heatmap, write_outputs
from .inputs import CaptureSpec, ModelSpec, TextSpec
from .plan import PlanConstraints, PlanResult, run_plan
from .validate import check_validate_options, plan_for_model, run_search, run_validate

__all__ = [
    "CaptureSpec", "CompareResult", "FrontierResult", "HealConfig", "HealStart", "HeadsResult", "run_heads", "ModelSpec", "PlanConstraints", "PlanResult", "TextSpec", "analyse", "build_report",
    "check_validate_options", "choose_path", "plan_for_model", "preflight", "redraw_heatmap", "run_compare", "run_frontier", "run_heal", "run_heatmap", "run_plan",
    "run_search", "run_validate", "sequence_stats", "write_outputs", "YARDSTICKS",
]
