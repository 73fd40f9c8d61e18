"""The inference path's decode step: an anchor forms its softmax row once and followers reuse it with their own values.

At decode a step has one new query per sequence, so the anchor's probabilities are tiny ([B, Hq, 1, K]): the anchor
computes them (reading its keys once) and its own output from them, and each follower multiplies them by its own
values, reading no keys at all. Prefill keeps the model's own kernel (flash kernels never form the probabilities).
Query heads are grouped over their key/value heads as transformers' `repeat_kv` groups them (query head h reads key
head h // G), so nothing is expanded: scores [B, Hkv, G, K], values [B, Hkv, K, D].

On a GPU in half precision the scores and the row times values run as the split-key Triton kernels of
`patch.kernels` (one pass over K or V at the GPU's bandwidth); elsewhere, and as their reference, as batched matmuls.
"""

from __future__ import annotations

import torch

from ..capture import AttentionInputs
from . import kernels


def scores_fp32(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, K] float32 dot products of grouped queries [B, Hkv, G, D] with keys [B, Hkv, K, D]: from the
    half-precision operands directly on a GPU (the split-key kernel, else `out_dtype`: one read of the keys), through
    float32 copies elsewhere."""
    if kernels.usable(key):
        return kernels.scores(query, key)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        b, h, g, d = query.shape
        flat_q, flat_k = query.reshape(b * h, g, d), key.reshape(b * h, key.shape[2], d)
        return torch.bmm(flat_q, flat_k.transpose(1, 2), out_dtype=torch.float32).view(b, h, g, key.shape[2])
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2))


def decode_probs(inputs: AttentionInputs) -> torch.Tensor:
    """[B, Hq, 1, K] the anchor's softmax for one decode step (float32; float64 for float64 models), 0 where masked,
    with the model's scaling, logit softcapping, mask and sliding window."""
    query, key = inputs.query, inputs.key  # [B, Hq, 1, D], [B, Hkv, K, D]
    batch, n_heads, _, dim = query.shape
    n_kv, n_keys = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, n_kv, n_heads // n_kv, dim)  # [B, Hkv, G, D]: one query row per head
    scores = scores_fp32(grouped, key) * inputs.scaling  # [B, Hkv, G, K]
    if inputs.softcap is not None:
        scores = torch.tanh(scores / inputs.softcap) * inputs.softcap
    allowed = inputs.allowed()  # [B|1, 1|Hq, 1, K]
    allowed = allowed.reshape(allowed.shape[0], n_kv, -1, n_keys) if allowed.shape[1] > 1 else allowed.reshape(allowed.shape[0], 1, 1, n_keys)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # [B, Hkv, G, K]
    return probs.reshape(batch, n_heads, 1, n_keys)


def attend(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, 1, Hq, D] attention output of decode probabilities [B, Hq, 1, K] over values [B, Hkv, K, D] (query head h
    reads value head h // G), as the attention functions return it."""
    batch, n_heads, _, n_keys = probs.shape
    n_kv = value.shape[1]
    grouped = probs.reshape(batch, n_kv, n_heads // n_kv, n_keys)  # [B, Hkv, G, K]
    if kernels.usable(value):
        output = kernels.row_values(grouped, value)  # [B, Hkv, G, D]: split over keys, one pass over V
    else:
        output = torch.matmul(grouped.to(value.dtype), value)  # [B, Hkv, G, D]
    return output.reshape(batch, n_heads, 1, -1).transpose(1, 2)  # [B, 1, Hq, D]
