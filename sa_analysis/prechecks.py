"""Everything a job can check before torch is imported or a model loads, in one call: the output folder, the text,
--seq-len against the context and spans or a plan file (its head maps too) against the layer and head counts that
the model's config states.

Light on purpose (no torch, no transformers): the CLI calls it first, so that a mistake is answered in a second or
two; the pipeline's jobs call it too, for library users.
"""

from __future__ import annotations

from pathlib import Path

from .data import load_documents
from .errors import UserError
from .io import ensure_writable_dir
from .planner import SharePlan
from .planner.plan import check_head_map
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
