"""Held-out perplexity and faithfulness, and how much of the gap between a shared model and its unshared counterpart
healing closed.

The measurement itself is the project's one held-out measurement (`damage.heldout`). Three yardsticks for a healed
shared model (docs/DESIGN.md, "The frontier and healing"): the untouched model (what the
user ships against what they had), the control (what sharing costs under the same fine-tune) and faithfulness: next-
token KL to the untouched model and top-1 agreement with it, which tell a restored model from a changed one where
perplexity cannot (an LM-loss heal lowers perplexity on its text while moving the model away from the original).

The honest comparison (docs/DESIGN.md, "Healing"): before healing, the shared model against the untouched one;
after healing, the healed shared model against a *control*, the unshared model fine-tuned with the same data, steps,
adapters and seed. Against the untouched model instead, whatever the fine-tune teaches about the text would be
counted as recovery from sharing (on the default text a heal "recovered 185 %").
"""

from __future__ import annotations

import math

import torch

from ..damage.heldout import Untouched, measure_heldout
from ..stats import paired_interval



def sequence_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """[S] mean next-token NLL of each sequence of `input_ids` [S, T] (every position but the first is predicted):
    per sequence, so that differences between two models get intervals over sequences."""
    return measure_heldout(None, Untouched.record(model, input_ids, batch_size)).nll  # one forward, read as recorded


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
