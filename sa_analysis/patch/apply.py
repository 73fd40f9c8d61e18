"""Applying Shared Attention to a model, and removing it again exactly."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from torch import nn

from .. import compat, parts
from ..capture import CAPTURE_PREFIX, original_attention, register_attention
from ..errors import UserError
from .anchors import check_mode, plan_anchors, plan_head_maps
from .follower import SharedAttention
from .stash import SHARE_PREFIX, LayerSession, ShareState, shared_attention_forward

if TYPE_CHECKING:
    from ..planner.plan import PlanLike



SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


SUPPORTED_BASES = ("sdpa", "eager")


_FOLLOWER_NEEDS = ("v_proj", "o_proj", "head_dim", "num_key_value_groups", "layer_idx")


class SharedAttentionHandle:
    """A Shared Attention patch in force; `remove()` (or leaving the `with` block) restores the model exactly."""

    def __init__(self, model: nn.Module, anchor_of: dict[int, int], mode: str, head_map: Mapping[int, tuple[int, ...]] | None = None):
        self.model = model
        self.anchor_of = dict(anchor_of)
        self.head_map = dict(head_map or {})  # follower -> anchor head per query head; absent: by index
        self.mode = mode
        self._base: str | None = None
        self._sessions: list[nn.Module] = []
        self._swapped: list[tuple[int, nn.Module, SharedAttention]] = []  # (layer, original, follower)
        self._layer_types: list[str] | None = None  # the config's own list, while followers take their anchor's
        self.active = False

    @property
    def followers(self) -> list[int]:
        return sorted(self.anchor_of)

    def __enter__(self) -> "SharedAttentionHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Undo everything `share_attention` did, in reverse; safe to call twice or after a partial install."""
        try:
            if self._base is not None and compat.attention_implementation(self.model) != self._base:
                self.model.set_attn_implementation(self._base)
        finally:
            for index, original, follower in reversed(self._swapped):
                if parts.attention_of(self.model, index) is follower:
                    parts.swap_attention(self.model, index, original)
            self._swapped.clear()
            for module in self._sessions:
                module.__dict__.pop("_sa_share", None)
            self._sessions.clear()
            if self._layer_types is not None:
                compat.set_layer_types(self.model, self._layer_types)
                self._layer_types = None
            self.active = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[nn.Module]:
        """The model exactly as it was before patching inside the block (a distillation teacher's forward: the same
        weights, nothing shared); the patch is in force again after it, also when the block raises."""
        if not self.active:
            raise RuntimeError("This Shared Attention patch is not in force; there is nothing to suspend.")
        self.remove()
        try:
            yield self.model
        finally:
            _install(self)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        aligned = f", head_map for {sorted(self.head_map)}" if self.head_map else ""
        return f"SharedAttentionHandle({state}, mode={self.mode}, anchor_of={self.anchor_of}{aligned})"


def share_attention(model: nn.Module, plan: PlanLike, mode: str = "fast", head_map: Mapping[Any, Any] | None = None,
                    probe: bool = False) -> SharedAttentionHandle:
    """Apply Shared Attention for `plan` (a SharePlan or `{follower: anchor}`) to `model`; returns the handle.

    `head_map` ({follower: [anchor head for each query head]}, default: the SharePlan's own `head_map`) makes a
    follower's query head h reuse the anchor's head `map[h]`; followers without one share by index.

    Use as a context manager (`with share_attention(model, plan): ...`) or keep the handle and call `remove()`.
    `mode="fast"` attends with the anchor's Q and K through the model's kernel; `mode="exact"` reuses the
    anchor's materialised fp32 softmax. An empty plan leaves every output bit-identical.
    """
    check_mode(mode)
    _check_model(model)
    modules = parts.attention_modules(model)
    anchor_of = plan_anchors(plan, len(modules), probe)
    maps = plan_head_maps(plan, anchor_of, int(model.config.get_text_config().num_attention_heads), head_map)
    for follower in sorted(anchor_of):
        _check_follower(modules[follower])
    handle = SharedAttentionHandle(model, anchor_of, mode, maps)
    _install(handle)
    return handle


def _install(handle: SharedAttentionHandle) -> None:
    """Swap in the followers, attach the anchors' sessions, select the sharing attention function: the patch of
    `handle` (its plan checked) in force; on any error everything done is undone."""
    model, anchor_of = handle.model, handle.anchor_of
    base = _check_model(model)
    modules = parts.attention_modules(model)
    followers_of: dict[int, list[int]] = {}
    for follower, anchor in sorted(anchor_of.items()):
        followers_of.setdefault(anchor, []).append(follower)
    state = ShareState(mode=handle.mode, followers_of=followers_of)
    try:
        name = register_attention(SHARE_PREFIX, base, shared_attention_forward)
        _align_layer_types(model, anchor_of, handle)
        for idx, module in enumerate(modules):
            if idx in anchor_of:
                follower = SharedAttention(module, anchor_of[idx], state, original_attention(module, base), handle.head_map.get(idx))
                parts.swap_attention(model, idx, follower)
                handle._swapped.append((idx, module, follower))
            else:
                module._sa_share = LayerSession(original_attention(module, base), state, idx in followers_of)
                handle._sessions.append(module)
        handle._base = base
        model.set_attn_implementation(name)
        handle.active = True
    except BaseException:
        handle.remove()
        raise


def _check_model(model: nn.Module) -> str:
    """The base attention implementation, after checking the model is one the patch supports."""
    config = model.config
    model_type = config.get_text_config().model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"Shared Attention is not supported for {model_type!r} models; supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    base = compat.attention_implementation(model)
    if base.startswith((SHARE_PREFIX, CAPTURE_PREFIX)):
        raise UserError("This model is already patched (Shared Attention or attention capture is active); remove that first.")
    if base not in SUPPORTED_BASES:
        raise UserError(f"Shared Attention works on top of sdpa or eager attention, not {base!r}; load the model with sdpa.")
    return base


def _check_follower(module: nn.Module) -> None:
    """A follower's attention module (where `parts` finds it) must have the parts SharedAttention needs."""
    missing = [name for name in _FOLLOWER_NEEDS if not hasattr(module, name)]
    if missing:
        raise UserError(f"Layer {module.layer_idx}'s attention has no {', '.join(missing)}; this attention module is not supported.")
    if hasattr(module, "v_norm"):
        raise UserError(f"Layer {module.layer_idx}'s attention normalises its values (v_norm), which Shared Attention does not support.")


def _align_layer_types(model: nn.Module, anchor_of: Mapping[int, int], handle: SharedAttentionHandle) -> None:
    """Give each follower its anchor's layer type (sliding/full) in the config while patched.

    The follower reuses the anchor's softmax, so it attends within the anchor's window; its cache layer (built from
    `config.layer_types` by generate()) must then keep as many values as the anchor keeps keys.
    """
    types = compat.layer_types(model)
    if not types or all(types[f] == types[a] for f, a in anchor_of.items()):
        return
    aligned = list(types)
    for follower, anchor in anchor_of.items():
        aligned[follower] = types[anchor]
    handle._layer_types = types
    compat.set_layer_types(model, aligned)
