"""The plan as SA semantics see it: {follower: anchor}, checked (layer 0 never shared, each follower reuses the last
non-shared layer before it), its head maps (which anchor head each follower head reuses), and the modes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping


from ..errors import UserError

if TYPE_CHECKING:
    from ..planner.plan import PlanLike


MODES = ("fast", "exact", "infer")  # infer: fast prefill, decode steps reuse the anchor's softmax row (patch.decode)


def check_mode(mode: str, where: str = "") -> str:
    """`mode` if it is a Shared Attention mode (fast, exact or infer), else a user error (`where`: e.g. " in FOLDER")."""
    if mode not in MODES:
        raise UserError(f"Unknown Shared Attention mode {mode!r}{where}; use fast, exact or infer.")
    return mode


def plan_anchors(plan: PlanLike, n_layers: int, probe: bool = False) -> dict[int, int]:
    """{follower: anchor} from a SharePlan (its `anchor_of`) or a plain mapping, checked against SA semantics.

    Anchors must be non-shared layers before their followers, layer 0 is never shared, and each follower's anchor
    must be the last non-shared layer before it (the reference semantics; anything else is a different method).
    `probe`: a measurement probe may name any earlier non-shared anchor (follower m reading anchor a while the layers
    between keep their own attention: what m would cost in a span that starts after a; `validate.damage`).
    """
    plan_layers = getattr(plan, "n_layers", None)
    if plan_layers is not None and int(plan_layers) != n_layers:
        raise UserError(f"The plan was made for a {plan_layers}-layer model but this model has {n_layers} layers; use a plan made for this model.")
    raw = plan.anchor_of if hasattr(plan, "anchor_of") else plan
    try:
        anchor_of = {_layer(f): _layer(a) for f, a in dict(raw).items()}
    except (TypeError, ValueError):
        raise UserError("A share plan must be a SharePlan or a mapping {follower layer: anchor layer} of integers.") from None
    followers = set(anchor_of)
    for follower, anchor in sorted(anchor_of.items()):
        if not 0 < follower < n_layers:
            raise UserError(f"Layer {follower} cannot be shared: followers must lie in 1..{n_layers - 1} (layer 0 has no earlier layer to reuse).")
        if not 0 <= anchor < follower:
            raise UserError(f"Follower {follower} has anchor {anchor}; an anchor must be an earlier layer.")
        if anchor in followers:
            raise UserError(f"Follower {follower} has anchor {anchor}, which is itself shared; anchors must keep their own attention.")
        expected = max(layer for layer in range(follower) if layer not in followers)
        if anchor != expected and not probe:
            raise UserError(f"Follower {follower} has anchor {anchor}, but Shared Attention reuses the last non-shared layer before it ({expected}); fix the plan.")
    return anchor_of


def _layer(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(value)
    return int(value)


def plan_head_maps(plan: PlanLike, anchor_of: Mapping[int, int], n_heads: int, head_map: Mapping[Any, Any] | None = None) -> dict[int, tuple[int, ...]]:
    """{follower: (anchor head for query head 0, 1, ...)} from `head_map`, else the plan's `head_map`, checked.

    A follower without an entry shares by index (head h reuses anchor head h). Any query head may take any anchor
    query head (a map need not be a permutation); under GQA the anchor head's key head comes with it.
    """
    from ..planner.plan import check_head_map

    raw = head_map if head_map is not None else getattr(plan, "head_map", None) or {}
    return {m: tuple(heads) for m, heads in check_head_map(raw, anchor_of, n_heads).items()}
