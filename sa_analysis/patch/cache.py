"""Bytes a transformers cache holds, per layer and in all (what sharing saves in the K cache)."""

from __future__ import annotations

from typing import Any

import torch

from .. import compat


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
