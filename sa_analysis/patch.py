"""Shared Attention (Liao & Vargas 2024) applied to a loaded transformers model, and removed again cleanly.

A *follower* layer `m` reuses, head by head, the attention pattern of its *anchor* `a` (the last non-shared layer
before it) with its **own** values and its own `o_proj`; it never computes `q_proj` / `k_proj`, and its KV cache
keeps values only.

How it is wired (no forward method is monkey-patched):

* One attention function is registered with transformers' `AttentionInterface` (with the base implementation's
  mask function under the same name in `AttentionMaskInterface`) and selected with `model.set_attn_implementation`.
  On every non-follower layer it calls the model's original implementation, so their outputs are unchanged; on an
  anchor it also stashes what the followers need: post-RoPE query, key (after the cache update), mask, scaling and
  the per-call extras (softcap, sliding window), and in exact mode the fp32 softmax.
* The `self_attn` submodule of each follower's decoder layer is swapped for a small `SharedAttention` module that
  holds the original `v_proj` and `o_proj`, computes V, reads the anchor's stash and attends:
    - ``mode="fast"``: the model's own attention kernel (SDPA, or eager where the model needs it, e.g. Gemma 2's
      logit softcapping) on `(Q_anchor, K_anchor, V_own)` with the anchor's mask: nothing `[B, H, Q, K]` is
      materialised;
    - ``mode="exact"``: `P_anchor @ V_own` with the anchor's materialised fp32 softmax (the SA reference code's
      semantics).
* KV cache: a follower calls `cache.update(key, value)` with a key of head dimension 0 (`[B, Hkv, T, 0]`), so the
  cache stores no K bytes but keeps its per-layer sequence bookkeeping (sliding-window layers count tokens). One
  wrinkle: a full-attention `DynamicLayer` reports `get_seq_length() == 0` for a follower (it counts key
  elements); transformers asks layer 0 and the first layer of each attention type, which are never followers
  (layer 0 is never shared, and a follower takes its earlier anchor's type, below).
* Sliding windows: a follower reuses its anchor's softmax, so it also uses the anchor's mask (window or not). When
  the config lists per-layer `layer_types`, followers take their anchor's type while patched, so that a cache built
  by `generate()` gives the follower's values the same length (window) as the anchor's keys.

Usage::

    with share_attention(model, plan):          # SharePlan, or a mapping {follower: anchor}
        model.generate(input_ids, max_new_tokens=32)

    handle = share_attention(model, {5: 4, 6: 4}, mode="exact")
    ...
    handle.remove()                              # bit-identical to the unpatched model again

Limits (documented, checked where possible): decoder-only models of the types in `SUPPORTED_MODEL_TYPES`, base
attention `sdpa` or `eager`; the dynamic (default) KV cache; no gradient checkpointing while patched (a follower's
recomputation would run before its anchor's). Gradients flow through the stash into the anchor (nothing is
detached). While patched, followers' unused `q_proj`/`k_proj` (and QK-norms) are out of the module tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import compat
from .capture import (CAPTURE_PREFIX, AttentionInputs, attention_modules, decoder_layers, original_attention,
                      register_attention)
from .errors import UserError

SHARE_PREFIX = "sa_share_"
MODES = ("fast", "exact")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
SUPPORTED_BASES = ("sdpa", "eager")
_FOLLOWER_NEEDS = ("v_proj", "o_proj", "head_dim", "num_key_value_groups", "layer_idx")


# ----- the plan as a follower -> anchor mapping -------------------------------------------------------------
def check_mode(mode: str, where: str = "") -> str:
    """`mode` if it is a Shared Attention mode (fast or exact), else a user error (`where`: e.g. " in FOLDER")."""
    if mode not in MODES:
        raise UserError(f"Unknown Shared Attention mode {mode!r}{where}; use fast or exact.")
    return mode


def plan_anchors(plan: Any, n_layers: int) -> dict[int, int]:
    """{follower: anchor} from a SharePlan (its `anchor_of`) or a plain mapping, checked against SA semantics.

    Anchors must be non-shared layers before their followers, layer 0 is never shared, and each follower's anchor
    must be the last non-shared layer before it (the reference semantics; anything else is a different method).
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
        if anchor != expected:
            raise UserError(f"Follower {follower} has anchor {anchor}, but Shared Attention reuses the last non-shared layer before it ({expected}); fix the plan.")
    return anchor_of


def _layer(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(value)
    return int(value)


# ----- what an anchor leaves for its followers --------------------------------------------------------------
@dataclass
class AnchorStash:
    """One anchor call's attention inputs (post-RoPE, post cache update), and its softmax in exact mode."""

    inputs: AttentionInputs  # query [B, Hq, Q, D], key [B, Hkv, K, D], mask, scaling, softcap, sliding window
    kwargs: dict[str, Any]  # every extra argument of the anchor's attention call (sliding_window, softcap, ...)
    probs: torch.Tensor | None  # [B, Hq, Q, K] fp32 (fp64 for fp64 models) softmax, exact mode only
    readers_left: int


@dataclass
class _ShareState:
    """Shared by the registered function and the follower modules of one patched model."""

    mode: str
    followers_of: dict[int, list[int]]  # anchor -> its followers
    stash: dict[int, AnchorStash] = field(default_factory=dict)

    def put(self, anchor: int, entry: AnchorStash) -> None:
        self.stash[anchor] = entry

    def read(self, anchor: int, follower: int) -> AnchorStash:
        """The anchor's stash for this forward; released after its last follower has read it."""
        entry = self.stash.get(anchor)
        if entry is None:
            raise RuntimeError(f"Shared Attention: follower layer {follower} ran before its anchor layer {anchor} in this forward; run the whole model.")
        entry.readers_left -= 1
        if entry.readers_left <= 0:
            del self.stash[anchor]
        return entry


@dataclass
class _LayerSession:
    """Attached to each non-follower attention module while patched."""

    original: Callable
    state: _ShareState
    is_anchor: bool


def exact_probs(inputs: AttentionInputs) -> torch.Tensor:
    """[B, Hq, Q, K] softmax of the anchor's logits in fp32 (fp64 for fp64 inputs); 0 where masked, not detached."""
    dtype = torch.float64 if inputs.query.dtype == torch.float64 else torch.float32
    probs = torch.softmax(inputs.logits(dtype=dtype), dim=-1)
    return probs.nan_to_num(0.0)  # rows with no allowed key (padding) are NaN after softmax


def shared_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered with transformers: the original output; anchors also stash for followers.

    `query` [B, Hq, Q, D], `key`/`value` [B, Hkv, K, D] (after the cache update); returns the original
    implementation's `([B, Q, Hq, D], weights or None)`.
    """
    session: _LayerSession | None = module.__dict__.get("_sa_share")
    if session is None:
        raise RuntimeError("sa-analysis Shared Attention was selected outside `share_attention`; select it only through that function.")
    output = session.original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if session.is_anchor:
        inputs = AttentionInputs(
            layer_idx=module.layer_idx, query=query, key=key, mask=attention_mask,
            scaling=scaling if scaling is not None else module.head_dim ** -0.5,
            softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"),
        )
        probs = exact_probs(inputs) if session.state.mode == "exact" else None
        readers = len(session.state.followers_of[module.layer_idx])
        session.state.put(module.layer_idx, AnchorStash(inputs, dict(kwargs, scaling=inputs.scaling), probs, readers))
    return output


# ----- the follower module ----------------------------------------------------------------------------------
class SharedAttention(nn.Module):
    """A follower's self-attention: its own V and `o_proj`, its anchor's attention pattern; no Q, no K.

    Called by the decoder layer exactly like the module it replaces; returns `(output [B, T, hidden], None)`.
    """

    def __init__(self, original: nn.Module, anchor: int, state: _ShareState, attention_fn: Callable):
        super().__init__()
        self.layer_idx = original.layer_idx
        self.anchor_idx = anchor
        self.config = original.config
        self.head_dim = original.head_dim
        self.num_key_value_groups = original.num_key_value_groups  # read by transformers' SDPA / eager functions
        self.is_causal = getattr(original, "is_causal", True)
        self.attention_dropout = float(getattr(original, "attention_dropout", 0.0) or 0.0)
        self.v_proj = original.v_proj
        self.o_proj = original.o_proj
        # plain attributes (not submodules): the original module comes back on removal; the state is shared
        self.__dict__["original"] = original
        self.__dict__["_state"] = state
        self.__dict__["_attention_fn"] = attention_fn

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, anchor={self.anchor_idx}, mode={self._state.mode}"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """`hidden_states` [B, T, hidden] -> `o_proj(attention(anchor) @ V_own)`; the anchor's mask replaces ours.

        The KV cache arrives as `cache=` (transformers >= 5.24) or `past_key_values=` (before): both are accepted.
        """
        input_shape = hidden_states.shape[:-1]
        value = self.v_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        cache = compat.cache_from_kwargs(kwargs)
        if cache is not None:
            value = self._cache_values(cache, value)  # [B, Hkv, K, D]
        anchor = _on_device(self._state.read(self.anchor_idx, self.layer_idx), value.device)
        if anchor.inputs.key.shape[-2] != value.shape[-2]:
            raise RuntimeError(
                f"Shared Attention: follower {self.layer_idx} has {value.shape[-2]} cached values but its anchor "
                f"{self.anchor_idx} has {anchor.inputs.key.shape[-2]} keys; build the cache after patching (or let generate() build it).")
        if self._state.mode == "exact":
            output = self._attend_exact(anchor, value)
        else:
            output = self._attend_fast(anchor, value)
        output = output.reshape(*input_shape, -1).contiguous()  # [B, T, Hq * D]
        return self.o_proj(output), None

    def _cache_values(self, cache: Any, value: torch.Tensor) -> torch.Tensor:
        """Store V only: a key with head dimension 0 costs no bytes but keeps the cache's length bookkeeping."""
        no_key = value.new_empty(*value.shape[:-1], 0)  # [B, Hkv, T, 0]
        _, value = cache.update(no_key, value, self.layer_idx)
        return value

    def _attend_fast(self, anchor: AnchorStash, value: torch.Tensor) -> torch.Tensor:
        """The model's own attention kernel on (Q_anchor, K_anchor, V_own) with the anchor's mask: [B, Q, Hq, D]."""
        inputs = anchor.inputs
        kwargs = dict(anchor.kwargs)
        scaling = kwargs.pop("scaling")
        dropout = self.attention_dropout if self.training else 0.0
        output, _ = self._attention_fn(self, inputs.query, inputs.key, value, inputs.mask, scaling=scaling, dropout=dropout, **kwargs)
        return output

    def _attend_exact(self, anchor: AnchorStash, value: torch.Tensor) -> torch.Tensor:
        """`P_anchor @ V_own` with the anchor's materialised softmax, like eager attention: [B, Q, Hq, D]."""
        probs = anchor.probs.to(value.dtype)  # [B, Hq, Q, K]
        if self.training and self.attention_dropout:
            probs = nn.functional.dropout(probs, p=self.attention_dropout)
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)  # [B, Hq, K, D]
        return torch.matmul(probs, value).transpose(1, 2)  # [B, Q, Hq, D]


def _on_device(entry: AnchorStash, device: torch.device) -> AnchorStash:
    """The stash on the follower's device (anchor and follower may sit on different GPUs with a device_map)."""
    if entry.inputs.query.device == device:
        return entry
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    inputs = entry.inputs
    moved = AttentionInputs(inputs.layer_idx, move(inputs.query), move(inputs.key), move(inputs.mask), inputs.scaling,
                            inputs.softcap, inputs.sliding_window)
    return AnchorStash(moved, {k: move(v) for k, v in entry.kwargs.items()}, move(entry.probs), entry.readers_left)


# ----- applying and removing --------------------------------------------------------------------------------
class SharedAttentionHandle:
    """A Shared Attention patch in force; `remove()` (or leaving the `with` block) restores the model exactly."""

    def __init__(self, model: nn.Module, anchor_of: dict[int, int], mode: str):
        self.model = model
        self.anchor_of = dict(anchor_of)
        self.mode = mode
        self._base: str | None = None
        self._sessions: list[nn.Module] = []
        self._swapped: list[tuple[nn.Module, nn.Module, SharedAttention]] = []  # (decoder layer, original, follower)
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
            for block, original, follower in reversed(self._swapped):
                if block.self_attn is follower:
                    block.self_attn = original
            self._swapped.clear()
            for module in self._sessions:
                module.__dict__.pop("_sa_share", None)
            self._sessions.clear()
            if self._layer_types is not None:
                compat.set_layer_types(self.model, self._layer_types)
                self._layer_types = None
            self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"SharedAttentionHandle({state}, mode={self.mode}, anchor_of={self.anchor_of})"


def share_attention(model: nn.Module, plan: Any, mode: str = "fast") -> SharedAttentionHandle:
    """Apply Shared Attention for `plan` (a SharePlan or `{follower: anchor}`) to `model`; returns the handle.

    Use as a context manager (`with share_attention(model, plan): ...`) or keep the handle and call `remove()`.
    `mode="fast"` attends with the anchor's Q and K through the model's kernel; `mode="exact"` reuses the
    anchor's materialised fp32 softmax. An empty plan leaves every output bit-identical.
    """
    check_mode(mode)
    base = _check_model(model)
    modules = attention_modules(model)
    anchor_of = plan_anchors(plan, len(modules))
    blocks = decoder_layers(model)
    followers_of: dict[int, list[int]] = {}
    for follower, anchor in sorted(anchor_of.items()):
        followers_of.setdefault(anchor, []).append(follower)
        _check_follower(blocks[follower], modules[follower])
    state = _ShareState(mode=mode, followers_of=followers_of)
    handle = SharedAttentionHandle(model, anchor_of, mode)
    try:
        name = register_attention(SHARE_PREFIX, base, shared_attention_forward)
        _align_layer_types(model, anchor_of, handle)
        for idx, module in enumerate(modules):
            if idx in anchor_of:
                follower = SharedAttention(module, anchor_of[idx], state, original_attention(module, base))
                blocks[idx].self_attn = follower
                handle._swapped.append((blocks[idx], module, follower))
            else:
                module._sa_share = _LayerSession(original_attention(module, base), state, idx in followers_of)
                handle._sessions.append(module)
        handle._base = base
        model.set_attn_implementation(name)
        handle.active = True
    except BaseException:
        handle.remove()
        raise
    return handle


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


def _check_follower(block: nn.Module, module: nn.Module) -> None:
    """A follower's decoder layer must hold its attention as `self_attn` with the parts SharedAttention needs."""
    if getattr(block, "self_attn", None) is not module:
        raise UserError(f"Layer {module.layer_idx}'s attention is not its decoder layer's `self_attn`; this model layout is not supported.")
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


# ----- measuring the cache -----------------------------------------------------------------------------------
def cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes held by a transformers cache after a forward: {"keys", "values", "total"} summed over layers."""
    per_layer = layer_cache_bytes(cache)
    keys, values = sum(k for k, _ in per_layer), sum(v for _, v in per_layer)
    return {"keys": keys, "values": values, "total": keys + values}


def layer_cache_bytes(cache: Any) -> list[tuple[int, int]]:
    """[(key bytes, value bytes)] per layer of a transformers cache."""
    return [(_nbytes(keys), _nbytes(values)) for keys, values in compat.cache_layer_tensors(cache)]


def _nbytes(tensor: torch.Tensor | None) -> int:
    return int(tensor.numel() * tensor.element_size()) if isinstance(tensor, torch.Tensor) else 0


__all__ = [
    "MODES", "SUPPORTED_MODEL_TYPES", "AnchorStash", "SharedAttention", "SharedAttentionHandle", "cache_bytes",
    "exact_probs", "layer_cache_bytes", "plan_anchors", "share_attention", "shared_attention_forward",
]
