"""What an anchor leaves for its followers in one forward, and the attention function that leaves it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..capture import AttentionInputs
from .decode import attend, decode_probs


SHARE_PREFIX = "sa_share_"


@dataclass
class AnchorStash:
    """One anchor call's attention inputs (post-RoPE, post cache update), and its softmax in exact mode."""

    inputs: AttentionInputs  # query [B, Hq, Q, D], key [B, Hkv, K, D], mask, scaling, softcap, sliding window
    kwargs: dict[str, Any]  # every extra argument of the anchor's attention call (sliding_window, softcap, ...)
    probs: torch.Tensor | None  # [B, Hq, Q, K] fp32 (fp64 for fp64 models) softmax: exact mode, and infer mode's decode steps
    readers_left: int


@dataclass
class ShareState:
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
class LayerSession:
    """Attached to each non-follower attention module while patched."""

    original: Callable
    state: ShareState
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
    session: LayerSession | None = module.__dict__.get("_sa_share")
    if session is None:
        raise RuntimeError("sa-analysis Shared Attention was selected outside `share_attention`; select it only through that function.")
    if not session.is_anchor:
        return session.original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    inputs = AttentionInputs(
        layer_idx=module.layer_idx, query=query, key=key, mask=attention_mask,
        scaling=scaling if scaling is not None else module.head_dim ** -0.5,
        softcap=kwargs.get("softcap"), sliding_window=kwargs.get("sliding_window"),
    )
    probs, output = None, None
    if session.state.mode == "exact":
        probs = exact_probs(inputs)
    elif session.state.mode == "infer" and query.shape[2] == 1:  # a decode step: the softmax row, formed once
        probs = decode_probs(inputs)  # [B, Hq, 1, K]
        output = (attend(probs, value), None)  # [B, 1, Hq, D]: the anchor's own output from the same row
    if output is None:
        output = session.original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    readers = len(session.state.followers_of[module.layer_idx])
    session.state.put(module.layer_idx, AnchorStash(inputs, dict(kwargs, scaling=inputs.scaling), probs, readers))
    return output


def stash_on_device(entry: AnchorStash, device: torch.device) -> AnchorStash:
    """The stash on the follower's device (anchor and follower may sit on different GPUs with a device_map)."""
    if entry.inputs.query.device == device:
        return entry
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    inputs = entry.inputs
    moved = AttentionInputs(inputs.layer_idx, move(inputs.query), move(inputs.key), move(inputs.mask), inputs.scaling,
                            inputs.softcap, inputs.sliding_window)
    return AnchorStash(moved, {k: move(v) for k, v in entry.kwargs.items()}, move(entry.probs), entry.readers_left)
