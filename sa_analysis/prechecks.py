"""Everything a job can check before torch is imported or a model loads, in one call: the output folder, the text,
--seq-len against the context and spans or a plan file (its head maps too) against the layer and head counts that
the model's config states.

Light on purpose (no torch, no transformers): the CLI calls it first, so that a mistake is answered in a second or
two; the pipeline's jobs call it too, for library users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .choices import BASELINES, check_choice, check_heal_objective, parse_baselines, parse_rows
from .data import DEFAULT_TEXT, SOURCE_TEXT, load_documents, mixture_parts
from .errors import UserError
from .io import default_out_dir, ensure_writable_dir
from .planner import COSTS, SharePlan, parse_budget
from .planner.layers import parse_ranges
from .planner.families import check_family_options
from .planner.plan import check_head_map
from .report import Metric, metric
from .shapes import peek_shape


def check_before_loading(model: str | None, *, out: str | Path | None = None, text: str | Path | None = None,
                         check_text: bool = True, seq_len: int | None = None, spans: str | None = None,
                         plan_file: str | Path | None = None) -> SharePlan | None:
    """Check the inputs of a job on `model` that need no model; returns the plan read from `plan_file` (or None)."""
    if out is not None:
        ensure_writable_dir(out)
    if check_text:
        load_documents(text)  # a missing, empty or binary text file
    shape = peek_shape(model) if model else None
    if shape is not None and seq_len is not None:
        shape.check_seq_len(seq_len)
    if spans is not None:  # syntax and order always; the range where the config states the layers
        SharePlan.from_spans(spans, shape.n_layers if shape else 1_000_000)
    plan = SharePlan.load(plan_file) if plan_file is not None else None
    if plan is not None and shape is not None and plan.n_layers != shape.n_layers:
        raise UserError(f"The plan is for a {plan.n_layers}-layer model but {model} has {shape.n_layers} layers; "
                        f"use a plan made for this model.")
    if plan is not None and shape is not None and plan.head_map and shape.n_heads:
        check_head_map(plan.head_map, plan.followers, shape.n_heads)  # one anchor head per query head of this model
    return plan


PREDICTORS = ("auto", "output", "similarity")  # how recommend-spans prices plans


def check_plan_options(budget: str | None, max_cost: float | None, cost: str, predict: str = "auto"
                       ) -> int | float | None:
    """The parsed budget, after the checks that need no model (a typo is answered before anything loads)."""
    if predict not in PREDICTORS:
        raise UserError(f"Unknown --predict {predict!r}; choose auto, output or similarity.")
    parsed = parse_budget(budget) if budget is not None else None
    if parsed is not None and max_cost is not None:
        raise UserError("Give either --budget or --max-cost, not both; the max cost already decides how many layers to share.")
    if cost not in COSTS:
        raise UserError(f"Unknown --cost {cost!r}; choose one of {', '.join(COSTS)}.")
    return parsed


def parse_budgets(spec: str | None) -> list[int] | None:
    """`--budgets`: "1-15", "3,8,15" or a mix ("1-4,8") as sorted layer counts (the ranges read as layer lists are,
    `planner.parse_ranges`); None stays None (the default, 1 up to half the layers, once the count is known). Range:
    `check_budgets`."""
    if spec is None:
        return None
    ranges = parse_ranges(spec, "--budgets", "layer counts from 1, e.g. 1-15 or 3,8,15")
    return check_budgets([b for first, last in ranges for b in range(first, last + 1)])


def check_data_file(path: str | Path | None, flag: str = "--data") -> None:
    """A heal's training data must hold text: a built-in text's name, or a file or folder that exists and holds text
    (read the way `--text` is read; Alpaca rows are made into examples once the tokenizer is loaded)."""
    if path is not None:
        load_documents(path, option=flag)


def heal_other_text(data: str | Path | None, chosen: str | Path | None, flag: str = "--text") -> str | Path:
    """The held-out text of another kind than the healing data: `chosen`, else a built-in text the data does not
    read: the standard library's code when the data reads the documentation, else the documentation (then the code);
    a mixture of both built-in texts must name one."""
    if chosen is not None:
        return chosen
    read = set(mixture_parts(data))
    preferred = (SOURCE_TEXT,) if DEFAULT_TEXT in read else (DEFAULT_TEXT, SOURCE_TEXT)
    left = [name for name in preferred if name not in read]
    if not left:
        raise UserError(f"The healing data reads both built-in texts; name a held-out text of another kind with {flag} "
                        f"(a file or folder the heal does not read).")
    return left[0]


def check_budgets(budgets: Sequence[int] | None, model: str | None = None, *, n_layers: int | None = None
                  ) -> list[int] | None:
    """Budgets (layer counts, parsed) in range: against `n_layers`, else the layer count the model's config says,
    before loading (`model` None and no count: a saved report's model, checked once it is read). Returns them
    sorted, or for None the default (1 up to half the layers) where the count is known."""
    if n_layers is None and model is not None:
        shape = peek_shape(model)
        n_layers = shape.n_layers if shape else None
    if budgets is None:
        return None if n_layers is None else list(range(1, n_layers // 2 + 1))
    wanted = sorted(set(int(b) for b in budgets))
    if not wanted or wanted[0] < 1:
        raise UserError(f"--budgets counts shared layers from 1 (layer 0 is never shared); got {list(budgets)}.")
    if n_layers is not None and wanted[-1] >= n_layers:
        raise UserError(f"--budgets asks to share {wanted[-1]} layers but the model has {n_layers} (layer 0 is never "
                        f"shared); the most is {n_layers - 1}.")
    return wanted


def check_frontier(model: str | None, *, budgets: Sequence[int] | None, baselines: Sequence[str] = (),
                   text: str | Path | None = None, seq_len: int | None = None, heal: bool = False,
                   heal_data: str | Path | None = None, other_text: str | Path | None = None) -> list[int] | None:
    """Every input of a frontier run that needs no model, checked once in one place (the CLI calls it before torch
    is imported, `run_frontier` for library users): the budgets against the layer count the config states (`model`
    None: a saved report's model, checked once it is read), the baseline methods, the text and --seq-len, the
    healing data and the other held-out text (with `heal`: one of another kind must exist). Returns the budgets
    sorted (None: the default, once the layer count is known)."""
    shape = peek_shape(model) if model else None
    wanted = check_budgets(budgets, n_layers=shape.n_layers if shape else None)
    check_baselines(baselines)
    if model is not None:
        load_documents(text)  # a missing, empty or binary text file
        if shape is not None and seq_len is not None:
            shape.check_seq_len(seq_len)
    check_data_file(heal_data, "--heal-data")
    if heal:
        heal_other_text(heal_data, other_text, "--other-text")  # a mixture of both built-in texts needs one named
    if other_text is not None:
        load_documents(other_text, option="--other-text")
    return wanted


def check_baselines(names: Sequence[str]) -> None:
    """Baseline methods by their names (`choices.BASELINES`), as `parse_baselines` gives them."""
    for name in names:
        check_choice(name, BASELINES, "baseline method", "one of")


def check_metric(name: str) -> Metric:
    """A known similarity metric (what it measures, whether higher is more alike); 'did you mean' otherwise."""
    return metric(name)


def output_folder(out: str | Path | None, model: str) -> Path:
    """The output folder: `out` when given, else sa-output/<model name made path-safe>/ (not created here)."""
    return default_out_dir(out, model)


__all__ = ["check_baselines", "check_before_loading", "check_budgets", "check_data_file", "check_frontier", "check_heal_objective", "heal_other_text", "check_family_options", "check_metric",
           "check_plan_options", "output_folder", "parse_baselines", "parse_budgets", "parse_rows"]
