"""A plan for validation: from a SharePlan, a mapping or a spans string, checked against the model it runs on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..errors import UserError
from ..patch import plan_anchors

if TYPE_CHECKING:
    from ..loading import ModelInfo
    from ..planner.plan import PlanLike


def as_plan(plan: PlanLike, n_layers: int, model: Mapping[str, Any] | None = None):
    """A planner `SharePlan` from a SharePlan, a `{follower: anchor}` mapping, or a spans string ("23-26,28-30")."""
    from ..planner import SharePlan

    if isinstance(plan, str):
        return SharePlan.from_spans(plan, n_layers, model=dict(model or {}))
    anchor_of = plan_anchors(plan, n_layers)  # checks the SA semantics and the layer count
    if isinstance(plan, SharePlan):
        return plan
    return SharePlan(n_layers=n_layers, followers=sorted(anchor_of), model=dict(model or {}))


def check_plan_for_model(plan: PlanLike, info: ModelInfo) -> None:
    """A plan made for another model (layer count, shape or name) is a user error, said in one sentence."""
    shape = getattr(plan, "model", None) or {}
    if int(getattr(plan, "n_layers", info.n_layers)) != info.n_layers:
        raise UserError(f"The plan is for a {plan.n_layers}-layer model but {info.name} has {info.n_layers} layers; use a plan made for this model.")
    for key in ("n_heads", "n_kv_heads", "head_dim", "hidden_size"):
        if shape.get(key) is not None and int(shape[key]) != int(getattr(info, key)):
            raise UserError(f"The plan's model has {key}={shape[key]} but {info.name} has {getattr(info, key)}; use a plan made for this model.")
    name = shape.get("name")
    if name and info.name and str(name).lower() != str(info.name).lower():
        raise UserError(f"The plan was made for {name} but the model is {info.name}; pass --model {name} or a plan made for this model.")


def predicted_savings(plan: PlanLike, info: ModelInfo, context_len: int) -> dict[str, Any] | None:
    """The planner's predicted savings for this model's shape at `context_len` (None for plans without them)."""
    if not hasattr(plan, "savings"):
        return None
    from ..planner import SharePlan

    model = dict(plan.model)
    for key, value in info.shape().items():
        if model.get(key) is None:
            model[key] = value
    shaped = SharePlan(n_layers=plan.n_layers, followers=list(plan.followers), model=model)
    bytes_per_element = torch.finfo(dtype_of(info.dtype)).bits // 8
    return shaped.savings(context_len=context_len, bytes_per_element=bytes_per_element)


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name, torch.float32)
