"""Everything a job can check before torch is imported or a model loads, in one call: the output folder, the text,
--seq-len against the context and spans or a plan file (its head maps too) against the layer and head counts that
the model's config states.

Light on purpose (no torch, no transformers): the CLI calls it first, so that a mistake is answered in a second or
two; the pipeline's jobs call it too, for library users.
"""

from __future__ import annotations

from pathlib import Path

from . import defaults
from .choices import check_heal_objective
from .data import DEFAULT_TEXT, SOURCE_TEXT, load_documents, mixture_parts
from .errors import UserError
from .io import default_out_dir, ensure_writable_dir
from .planner import COSTS, SharePlan, parse_budget
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


def parse_rows(rows: str | int | None, seq_len: int | None = None, path: str = "auto") -> str | int:
    """`--rows`: "auto" (all query rows unless that would take too long), "all", or how many rows to sample per
    sequence (at least 4 per replicate, so that the standard errors mean something; fewer than half of `seq_len`
    when it is known; only the streaming path samples)."""
    if rows is None:
        return defaults.ROWS
    text = str(rows).strip().lower()
    if text in ("auto", "all"):
        return text
    least = 4 * defaults.REPLICATES
    try:
        count = int(text)
    except ValueError:
        raise UserError(f"--rows {rows!r} is not auto, all or a number of rows; e.g. --rows 8192.") from None
    if count < least:
        raise UserError(f"--rows {count} is too few to sample: use at least {least} rows ({defaults.REPLICATES} "
                        f"replicates of 4), or --rows all.")
    if seq_len is not None and 2 * count > seq_len:
        raise UserError(f"--rows {count} is half or more of the {seq_len} query rows of a sequence, where sampling "
                        f"saves little; use --rows all, or fewer rows.")
    if path == "maps":
        raise UserError("--rows N samples query rows, which only the streaming path does; drop --path maps.")
    return count


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


def parse_budgets(spec: str | None, n_layers: int | None) -> list[int] | None:
    """`--budgets`: "1-15", "3,8,15" or a mix ("1-4,8"); None: 1 up to half the layers. Checked against the layer
    count where it is known (None is returned for the default while the count is not known)."""
    if spec is None:
        return None if n_layers is None else list(range(1, n_layers // 2 + 1))
    budgets: set[int] = set()
    for part in str(spec).replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        if not low.isdigit() or (dash and not high.isdigit()) or int(low) < 1 or (high and int(high) < int(low)):
            raise UserError(f"--budgets {spec!r} is not a list of layer counts; write e.g. 1-15 or 3,8,15 (counts from 1).")
        budgets.update(range(int(low), int(high or low) + 1))
    if n_layers is not None and max(budgets) >= n_layers:
        raise UserError(f"--budgets asks to share {max(budgets)} layers but the model has {n_layers} (layer 0 is never "
                        f"shared); the most is {n_layers - 1}.")
    return sorted(budgets)


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


def check_budgets(spec: str | None, model: str | None) -> None:
    """`--budgets` checked before loading: its syntax, and its range where the model's config says its layer count
    (`model` None: a saved report's model, checked once it is read)."""
    shape = peek_shape(model) if model is not None else None
    parse_budgets(spec, shape.n_layers if shape else None)


def check_metric(name: str) -> Metric:
    """A known similarity metric (what it measures, whether higher is more alike); 'did you mean' otherwise."""
    return metric(name)


def output_folder(out: str | Path | None, model: str) -> Path:
    """The output folder: `out` when given, else sa-output/<model name made path-safe>/ (not created here)."""
    return default_out_dir(out, model)


__all__ = ["check_before_loading", "check_budgets", "check_data_file", "check_heal_objective", "heal_other_text", "check_family_options", "check_metric",
           "check_plan_options", "output_folder", "parse_budgets", "parse_rows"]
