"""A follower's self-attention: its own V and o_proj, its anchor's attention pattern; no Q, no K, V-only cache."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .. import compat
from .decode import attend
from .stash import AnchorStash, ShareState, stash_on_device



class SharedAttention(nn.Module):
    """A follower's self-attention: its own V and `o_proj`, its anchor's attention pattern; no Q, no K.

    Called by the decoder layer exactly like the module it replaces; returns `(output [B, T, hidden], None)`.
    """

    def __init__(self, original: nn.Module, anchor: int, state: ShareState, attention_fn: Callable,
                 head_map: tuple[int, ...] | None = None):
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
        self.head_map = None if head_map is None else tuple(int(g) for g in head_map)  # query head h reuses anchor head head_map[h]
        self.__dict__["_index_cache"] = {}  # device -> (query heads, key heads) index tensors of the map
        # plain attributes (not submodules): the original module comes back on removal; the state is shared
        self.__dict__["original"] = original
        self.__dict__["_state"] = state
        self.__dict__["_attention_fn"] = attention_fn

    def extra_repr(self) -> str:
        aligned = "" if self.head_map is None else ", head-aligned"
        return f"layer={self.layer_idx}, anchor={self.anchor_idx}, mode={self._state.mode}{aligned}"

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
        anchor = stash_on_device(self._state.read(self.anchor_idx, self.layer_idx), value.device)
        if anchor.inputs.key.shape[-2] != value.shape[-2]:
            raise RuntimeError(
                f"Shared Attention: follower {self.layer_idx} has {value.shape[-2]} cached values but its anchor "
                f"{self.anchor_idx} has {anchor.inputs.key.shape[-2]} keys; build the cache after patching (or let generate() build it).")
        if self._state.mode == "exact":
            output = self._attend_exact(anchor, value)
        elif anchor.probs is not None:  # infer mode, a decode step: the anchor's softmax row, no keys read
            output = attend(self._mapped(anchor.probs), value)  # [B, 1, Hq, D]
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
        """The model's own attention kernel on (Q_anchor, K_anchor, V_own) with the anchor's mask: [B, Q, Hq, D].

        With a head map, query head h takes the anchor's query head g = map[h] and g's key head. When every query
        head of a KV group takes its keys from one anchor key head (an identity map, any map within groups), the
        call stays grouped; otherwise keys and values are expanded to one per query head.
        """
        inputs = anchor.inputs
        kwargs = dict(anchor.kwargs)
        scaling = kwargs.pop("scaling")
        dropout = self.attention_dropout if self.training else 0.0
        query, key, module = inputs.query, inputs.key, self
        if self.head_map is not None:
            query, key, value, module = self._gather_heads(query, key, value)
        output, _ = self._attention_fn(module, query, key, value, inputs.mask, scaling=scaling, dropout=dropout, **kwargs)
        return output

    def _gather_heads(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        """(query [B, Hq, Q, D], key, value, module for the attention call) under this follower's head map."""
        query_heads, key_heads, grouped = self._map_indices(query.device)
        query = query.index_select(1, query_heads)  # [B, Hq, Q, D]
        if grouped:
            return query, key.index_select(1, key_heads), value, self  # key [B, Hkv, K, D]: still grouped
        key = key.index_select(1, key_heads)  # [B, Hq, K, D]
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)  # [B, Hq, K, D]: the follower's value head h // G
        return query, key, value, _Ungrouped(self)

    def _map_indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(anchor query head per query head [Hq], key heads to gather [Hkv] or [Hq], grouped?), made once per device
        (no host-device copy or sync in the forward). Grouped: every query head of a KV group takes its keys from one
        anchor key head, so one key head per group is gathered."""
        if device not in self._index_cache:
            groups = self.num_key_value_groups
            key_of = [g // groups for g in self.head_map]  # the anchor key head each query head needs
            per_group = [key_of[k * groups:(k + 1) * groups] for k in range(len(key_of) // groups)]
            grouped = all(len(set(heads)) == 1 for heads in per_group)
            keys = [heads[0] for heads in per_group] if grouped else key_of
            self._index_cache[device] = (torch.tensor(self.head_map, device=device), torch.tensor(keys, device=device), grouped)
        return self._index_cache[device]

    def _mapped(self, probs: torch.Tensor) -> torch.Tensor:
        """The anchor's probabilities [B, Hq, Q, K] as this follower's heads read them (head h <- anchor head map[h])."""
        if self.head_map is None:
            return probs
        return probs.index_select(1, self._map_indices(probs.device)[0])

    def _attend_exact(self, anchor: AnchorStash, value: torch.Tensor) -> torch.Tensor:
        """`P_anchor @ V_own` with the anchor's materialised softmax, like eager attention: [B, Q, Hq, D]."""
        probs = self._mapped(anchor.probs.to(value.dtype))  # [B, Hq, Q, K]
        if self.training and self.attention_dropout:
            probs = nn.functional.dropout(probs, p=self.attention_dropout)
        value = value.repeat_interleave(self.num_key_value_groups, dim=1)  # [B, Hq, K, D]
        return torch.matmul(probs, value).transpose(1, 2)  # [B, Q, Hq, D]


class _Ungrouped:
    """The follower seen by an attention function as having one key/value head per query head (keys expanded)."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module):
        self.__dict__["_module"] = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
