"""Held-out perplexity and faithfulness, and how much of the gap between a shared model and its unshared counterpart
healing closed.

Three yardsticks for a healed shared model (docs/DESIGN.md, "The frontier and healing"): the untouched model (what the
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
from dataclasses import dataclass
from typing import Callable

import torch

from .. import parts
from ..damage.compare import Sums, chunks, compare_chunk, log_softmax
from ..stats import paired_interval



@dataclass
class Untouched:
    """The untouched model on held-out ids, kept to judge any later state of the same weights against it: its final
    hidden states per micro-batch and its output head (a frozen copy where the heal may train the head), from which
    its next-token log-probabilities are remade chunk by chunk (memory stays flat in the vocabulary)."""

    input_ids: torch.Tensor  # [S, T]
    hidden: list[torch.Tensor]  # per micro-batch [b, T, H], after the final norm
    head: Callable[[torch.Tensor], torch.Tensor]  # [..., H] -> [..., V] logits
    batch_size: int

    @classmethod
    @torch.no_grad()
    def record(cls, model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4,
               copy_head: bool = False) -> "Untouched":
        """One forward of `model` (unshared, untrained) over `input_ids` [S, T]; `copy_head`: keep a frozen copy of the
        output head (a heal that trains it would otherwise change the reference)."""
        hidden = [_final_hidden(model, ids) for ids in _micro_batches(model, input_ids, batch_size)]
        head = parts.frozen_head(model) if copy_head else (lambda h: parts.next_token_logits(model, h))
        return cls(input_ids, hidden, head, batch_size)


@torch.no_grad()
def measure(model: torch.nn.Module | None, untouched: Untouched) -> dict[str, list[float]]:
    """Per sequence, on the untouched model's held-out ids: the mean next-token NLL of `model` as it is now (patched,
    healed, or neither; None: the untouched model itself, from what was recorded, with no forward), the NLL of the
    untouched model, and how far `model` is from it: mean next-token KL(untouched || model) and top-1 agreement, over
    every position but the last (`damage.compare`, the one comparison of log-probabilities). {"nll",
    "untouched_nll", "kl", "top1"}: lists [S]."""
    found: dict[str, list[float]] = {"nll": [], "untouched_nll": [], "kl": [], "top1": []}
    starts = range(0, untouched.input_ids.shape[0], untouched.batch_size)
    for start, reference in zip(starts, untouched.hidden):
        ids = untouched.input_ids[start:start + untouched.batch_size].to(reference.device)  # [b, T]
        hidden = reference if model is None else _final_hidden(model, ids.to(parts.model_device(model)))
        hidden = hidden[:, :-1].to(reference.device)  # [b, T-1, H]: the positions with a next token
        reference, targets_all = reference[:, :-1], ids[:, 1:]  # [b, T-1, H], [b, T-1]
        sums = Sums.zeros(ids.shape[0])
        for part in chunks(targets_all.shape[1]):
            targets = targets_all[:, part]  # [b, c]
            base = log_softmax(untouched.head(reference[:, part]))  # [b, c, V]
            now = base if model is None else log_softmax(parts.next_token_logits(model, hidden[:, part]))
            sums.add(compare_chunk(base, now, targets.to(base.device)))
        n = sums.positions
        found["untouched_nll"] += (sums.nll_baseline / n).tolist()
        found["nll"] += ((sums.nll_baseline + sums.nll_change) / n).tolist()
        found["kl"] += (sums.kl / n).tolist()
        found["top1"] += (sums.agree / n).tolist()
    return found


def _micro_batches(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int):
    """`input_ids` [S, T] in micro-batches [b, T] on the model's input device."""
    device = parts.model_device(model)
    for i in range(0, input_ids.shape[0], batch_size):
        yield input_ids[i:i + batch_size].to(device)


def _final_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[b, T, H] the decoder's final hidden states (after its final norm), the model in eval mode for the call."""
    was_training = model.training
    model.eval()
    try:
        return parts.decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        model.train(was_training)


def sequence_nll(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> list[float]:
    """[S] mean next-token NLL of each sequence of `input_ids` [S, T] (every position but the first is predicted):
    per sequence, so that differences between two models get intervals over sequences."""
    return measure(None, Untouched.record(model, input_ids, batch_size))["nll"]  # one forward, read as recorded


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
