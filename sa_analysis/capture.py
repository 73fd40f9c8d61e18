"""Capture: see what every layer's attention sees, without changing what the model computes.

We register one attention function with transformers' `AttentionInterface` (and the matching mask function with
`AttentionMaskInterface`, otherwise the mask silently becomes None) and select it by name. The function calls the
model's original implementation (SDPA, or eager where the model needs it) for the output, so the model's output is
exactly what it was, and hands the layer's post-RoPE queries and keys, its mask, scaling, softcap and sliding
window to a *recorder* on the side.

Recorders decide what to keep:
  * `AttentionMaps` materialises log-probabilities `[B, H, Q, K]` for chosen layers (notebooks, short contexts);
  * the streaming engine keeps queries and keys only, and recomputes blocks of rows later.

Usage::

    maps = AttentionMaps(layers=[0, 5])
    with capture_attention(model, maps):
        model(input_ids)
    maps.log_probs[5]        # [B, H, Q, K], -inf where masked
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch

from . import compat, parts

CAPTURE_PREFIX = "sa_capture_"


# ----- what one layer's attention sees --------------------------------------------------------------------
@dataclass
class AttentionInputs:
    """The inputs of one layer's attention call, enough to recompute its weights exactly."""

    layer_idx: int
    query: torch.Tensor  # [B, Hq, Q, D] post-RoPE (and post QK-norm)
    key: torch.Tensor  # [B, Hkv, K, D] not repeated for GQA
    mask: torch.Tensor | None  # [B|1, 1, Q, K] bool (True = attend) or additive float; None = plain causal
    scaling: float
    softcap: float | None = None
    sliding_window: int | None = None

    @property
    def n_rep(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def allowed(self, rows: slice | None = None, n_keys: int | None = None) -> torch.Tensor:
        """[B|1, 1, q, k] bool: where query rows `rows` may attend among the first `n_keys` keys."""
        n_q, n_k = self.query.shape[2], self.key.shape[2]
        rows = rows or slice(0, n_q)
        n_keys = n_k if n_keys is None else n_keys
        if self.mask is None:
            allowed = causal_allowed(rows, n_q, n_k, n_keys, self.sliding_window, self.query.device)
        else:
            mask = self.mask[:, :, rows, :n_keys]
            allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
            if self.sliding_window is not None:  # harmless if the mask already has the window
                allowed = allowed & causal_allowed(rows, n_q, n_k, n_keys, self.sliding_window, self.query.device)
        return allowed

    def logits(self, rows: slice | None = None, n_keys: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """[B, Hq, q, k] attention logits in `dtype`, -inf where masked; softcapping applied as the model does."""
        rows = rows or slice(0, self.query.shape[2])
        n_keys = self.key.shape[2] if n_keys is None else n_keys
        query = self.query[:, :, rows].to(dtype)
        key = self.key[:, :, :n_keys].to(dtype).repeat_interleave(self.n_rep, dim=1)  # [B, Hq, k, D]
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scaling  # [B, Hq, q, k]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        return scores.masked_fill(~self.allowed(rows, n_keys), float("-inf"))

    def log_probs(self, rows: slice | None = None, n_keys: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """[B, Hq, q, k] log-softmax of the logits; rows with no allowed key (padding) are all -inf."""
        return masked_log_softmax(self.logits(rows, n_keys, dtype))


def causal_allowed(rows: slice, n_q: int, n_k: int, n_keys: int, window: int | None, device) -> torch.Tensor:
    """[1, 1, q, k] bool causal (and sliding-window) pattern of a call without a mask, as SDPA reads one: a single
    query (a decode step) sees every key; several queries are causal from the first key on (SDPA's `is_causal`, top-
    left aligned: a static cache's prefill has more key slots than queries, the slots past them still empty)."""
    q_pos = torch.arange(rows.start, rows.stop, device=device) + (n_k - 1 if n_q == 1 else 0)
    k_pos = torch.arange(n_keys, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
    return allowed[None, None]


def masked_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last axis that leaves fully masked rows at -inf instead of NaN."""
    out = torch.log_softmax(logits, dim=-1)
    return torch.where(torch.isnan(out), float("-inf"), out)


# ----- recorders ------------------------------------------------------------------------------------------
class Recorder(Protocol):
    """Receives the attention inputs of the layers it asked for."""

    layers: set[int] | None  # None: every layer

    def record(self, inputs: AttentionInputs) -> None: ...


class AttentionMaps:
    """Materialises each chosen layer's attention log-probabilities `[B, H, Q, K]` (short contexts only)."""

    def __init__(self, layers: list[int] | None = None, dtype: torch.dtype = torch.float32):
        self.layers = set(layers) if layers is not None else None
        self.dtype = dtype
        self.log_probs: dict[int, torch.Tensor] = {}

    def record(self, inputs: AttentionInputs) -> None:
        dtype = torch.float64 if inputs.query.dtype == torch.float64 else self.dtype
        self.log_probs[inputs.layer_idx] = inputs.log_probs(dtype=dtype).detach()

    def probs(self, layer: int) -> torch.Tensor:
        """[B, H, Q, K] attention weights of `layer` (0 where masked)."""
        return self.log_probs[layer].exp()


# ----- the attention function -------------------------------------------------------------------------------
@dataclass
class _Session:
    original: Callable
    recorder: Recorder
    record: bool


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered with transformers: the original output, and a record on the side.

    Args follow transformers' attention interface: `query` [B, Hq, Q, D], `key`/`value` [B, Hkv, K, D] (after
    the cache update), the mask made by the registered mask function, `scaling`, and per-model extras in
    `kwargs` (`sliding_window`, `softcap`). Returns `([B, Q, Hq, D], weights or None)` like the original.
    """
    session: _Session | None = module.__dict__.get("_sa_capture")
    if session is None:
        raise RuntimeError("sa-analysis capture attention was called outside `capture_attention`; select it only through that context manager.")
    output = session.original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if session.record:
        session.recorder.record(AttentionInputs(
            layer_idx=module.layer_idx,
            query=query.detach(),
            key=key.detach(),
            mask=attention_mask,
            scaling=scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1]),
            softcap=kwargs.get("softcap"),
            sliding_window=kwargs.get("sliding_window"),
        ))
    return output


def register_attention(prefix: str, base: str, function: Callable) -> str:
    """Register `function` as `<prefix><base>` with `<base>`'s mask function; return the name to select with
    `model.set_attn_implementation`."""
    return compat.register_attention(prefix + base, base, function)


def original_attention(module: torch.nn.Module, base: str) -> Callable:
    """The function the model would have called: a registered implementation, or its own eager function."""
    return compat.base_attention_function(module, base)


@contextmanager
def capture_attention(model: torch.nn.Module, recorder: Recorder) -> Iterator[Recorder]:
    """Within the block, every forward of `model` reports the chosen layers' attention inputs to `recorder`.

    The model's attention implementation is restored and every per-module attribute removed on exit, also
    when the block raises.
    """
    modules = parts.attention_modules(model)
    layers = set(range(len(modules))) if recorder.layers is None else set(recorder.layers)
    bad = sorted(l for l in layers if not 0 <= l < len(modules))
    if bad:
        raise ValueError(f"layers {bad} do not exist; this model has layers 0..{len(modules) - 1}")
    base = compat.attention_implementation(model)
    if base.startswith(CAPTURE_PREFIX):
        raise RuntimeError("capture_attention is already active on this model; nested captures are not supported")
    name = register_attention(CAPTURE_PREFIX, base, capture_attention_forward)
    try:
        for module in modules:
            module._sa_capture = _Session(original_attention(module, base), recorder, module.layer_idx in layers)
        model.set_attn_implementation(name)
        yield recorder
    finally:
        model.set_attn_implementation(base)
        for module in modules:
            module.__dict__.pop("_sa_capture", None)


# ----- hidden-state similarity (Block Influence) -------------------------------------------------------------
class BlockInfluence:
    """1 - cos(input, output hidden state) of each decoder layer, averaged over tokens (ShortGPT's statistic)."""

    def __init__(self, n_layers: int):
        self.sums = torch.zeros(n_layers, dtype=torch.float64)
        self.counts = torch.zeros(n_layers, dtype=torch.float64)

    def hook(self, layer: int):
        def on_forward(args, kwargs, output):
            hidden_in = parts.layer_input(args, kwargs)  # [B, T, hidden]
            hidden_out = parts.layer_output(output)  # [B, T, hidden]
            hidden_in = hidden_in.to(hidden_out.device)  # spread over GPUs, a layer's input and output may differ
            dtype = torch.float64 if hidden_in.dtype == torch.float64 else torch.float32
            cos = torch.nn.functional.cosine_similarity(hidden_in.to(dtype), hidden_out.to(dtype), dim=-1)  # [B, T]
            self.sums[layer] += (1.0 - cos).sum().item()
            self.counts[layer] += cos.numel()

        return on_forward

    def values(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)


@contextmanager
def measure_block_influence(model: torch.nn.Module) -> Iterator[BlockInfluence]:
    """Hooks on every decoder layer that accumulate Block Influence; removed on exit (`parts.layer_hooks`)."""
    n_layers = parts.n_layers(model)
    stats = BlockInfluence(n_layers)
    with parts.layer_hooks(model, after={i: stats.hook(i) for i in range(n_layers)}):
        yield stats
