"""Held-out perplexity, and how much of the gap between a shared model and its unshared counterpart healing closed.

The honest comparison (docs/DESIGN.md, "Healing"): before healing, the shared model against the untouched one;
after healing, the healed shared model against a *control*, the unshared model fine-tuned with the same data, steps,
adapters and seed. Against the untouched model instead, whatever the fine-tune teaches about the text would be
counted as recovery from sharing (on the default text a heal "recovered 185 %").
"""

from __future__ import annotations

import math

import torch

from ..stats import paired_interval



@torch.no_grad()
def sequence_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """[S] mean next-token NLL of each sequence of `input_ids` [S, T] (every position but the first is predicted):
    per sequence, so that differences between two models get intervals over sequences."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_sequence: list[float] = []
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, T-1]
            per_sequence += nll.double().mean(-1).tolist()
    finally:
        model.train(was_training)
    return per_sequence


def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of `model` on `input_ids` [S, T] (sequences of equal length)."""
    nll = sequence_nll(model, input_ids, batch_size)
    return math.exp(sum(nll) / len(nll))


def gap_interval(shared_nll: list[float], unshared_nll: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the per-sequence NLL difference shared - unshared (paired, 95 % Student-t)."""
    return paired_interval(shared_nll, unshared_nll)


def gap(shared: float, unshared: float) -> float:
    """What sharing costs: log(perplexity shared / perplexity unshared), nats per token (0: nothing)."""
    return math.log(shared / unshared)


def closed_fraction(gap_before: float, gap_after: float) -> float | None:
    """Share of the gap that healing closed (1: the healed shared model matches the control; above 1: it beats it;
    None when sharing cost nothing to begin with)."""
    if not (math.isfinite(gap_before) and gap_before > 0) or not math.isfinite(gap_after):
        return None
    return 1.0 - gap_after / gap_before
