"""Held-out perplexity, and the share of the loss to sharing that healing recovered."""

from __future__ import annotations

import math

import torch



@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of `model` on `input_ids` [S, T] (every position but the first is predicted)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[i:i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def recovered_fraction(baseline: float, patched: float, healed: float) -> float | None:
    """Share of the perplexity lost to sharing that healing won back (1 = back to baseline, > 1 = better than it)."""
    lost = patched - baseline
    if not (math.isfinite(lost) and lost > 0):
        return None
    return (patched - healed) / lost
