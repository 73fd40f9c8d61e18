"""The one held-out measurement: a model (shared by a plan, healed, or as it is) against the untouched model on the
same held-out tokens, per sequence: next-token NLL and perplexity with its interval, KL(untouched || model) and top-1
agreement at every position but the last.

`validate` (its quality section), the frontier (each budget's held-out point, and its `--baselines`) and `heal`
(before and after healing) all measure through `measure_heldout`, so the same plan on the same tokens prints the same
perplexity whichever command prints it. The untouched model is recorded once (`Untouched`: its final hidden states and
output head); its log-probabilities are remade chunk by chunk (`damage.logprobs`), so memory stays flat in the
vocabulary, and any later state of the same weights (patched, healed) is judged against that one recording.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch

from .. import parts
from ..patch import share_attention
from ..planner.record import Damage, Summary
from ..stats import interval, ppl_change
from .logprobs import Sums, chunks, compare_chunk, log_softmax, token_ids

if TYPE_CHECKING:
    from ..data import Tokens
    from ..planner.plan import PlanLike


@dataclass
class Untouched:
    """The untouched model on held-out ids, kept to judge any later state of the same weights against it: its final
    hidden states per micro-batch and its output head (a frozen copy where a heal may train the head), from which
    its next-token log-probabilities are remade chunk by chunk (memory stays flat in the vocabulary)."""

    input_ids: torch.Tensor  # [S, T]
    hidden: list[torch.Tensor]  # per micro-batch [b, T, H], after the final norm
    head: Callable[[torch.Tensor], torch.Tensor]  # [..., H] -> [..., V] logits
    batch_size: int

    @classmethod
    @torch.no_grad()
    def record(cls, model: torch.nn.Module, batch: Tokens, batch_size: int = 4, copy_head: bool = False) -> "Untouched":
        """One forward of `model` (unshared, untrained) over `batch` (a TokenBatch or ids [S, T]); `copy_head`: keep
        a frozen copy of the output head (a heal that trains it would otherwise change the reference)."""
        input_ids = token_ids(batch)
        hidden = [_final_hidden(model, ids) for ids in _micro_batches(model, input_ids, batch_size)]
        head = parts.frozen_head(model) if copy_head else (lambda h: parts.next_token_logits(model, h))
        return cls(input_ids, hidden, head, batch_size)


@dataclass
class HeldOut:
    """A model against the untouched model on the same held-out tokens: per sequence [S] means over every position
    but the last (sequences of equal length, so their mean is the mean over tokens)."""

    untouched_nll: list[float]  # [S] the untouched model's next-token NLL, nats
    nll_change: list[float]  # [S] the model's NLL less the untouched model's, summed position by position
    kl: list[float]  # [S] KL(untouched || model), nats
    top1: list[float]  # [S] share of positions whose most likely next token is the untouched model's
    kl_max: float  # the largest KL at any one position
    n_tokens: int  # next-token predictions compared

    @property
    def nll(self) -> list[float]:
        """[S] the model's next-token NLL, nats."""
        return [u + c for u, c in zip(self.untouched_nll, self.nll_change)]

    @property
    def perplexity(self) -> float:
        return math.exp(_mean(self.untouched_nll) + _mean(self.nll_change))

    @property
    def untouched_nll_mean(self) -> float:
        return _mean(self.untouched_nll)

    @property
    def untouched_perplexity(self) -> float:
        return math.exp(self.untouched_nll_mean)

    def damage(self) -> Damage:
        """The same measurement as output damage (KL, NLL change, top-1 per sequence)."""
        return Damage(list(self.kl), list(self.nll_change), list(self.top1))

    def summary(self) -> Summary:
        """KL and NLL change with their 95 % intervals over sequences, top-1 agreement, and the perplexity with the
        interval of its NLL change (`perplexity`, `perplexity_low`, `perplexity_high`)."""
        return Summary.of(self.kl, self.nll_change, self.top1, untouched_nll=_mean(self.untouched_nll))

    def quality(self) -> dict[str, float]:
        """`validate`'s quality section: both perplexities, the relative change with its 95 % interval, NLLs, KL
        (mean and largest), top-1 agreement, tokens compared."""
        change = interval("nll_change", self.nll_change)
        nll_b = _mean(self.untouched_nll)
        return {"ppl_baseline": math.exp(nll_b), "ppl_patched": math.exp(nll_b + change["nll_change"]),
                "ppl_change": ppl_change(change["nll_change"]), "ppl_change_low": ppl_change(change["nll_change_low"]),
                "ppl_change_high": ppl_change(change["nll_change_high"]), "nll_baseline": nll_b,
                "nll_patched": nll_b + change["nll_change"], "kl_mean": _mean(self.kl), "kl_max": self.kl_max,
                "top1_agreement": _mean(self.top1), "n_tokens": self.n_tokens}

    def per_sequence(self) -> dict[str, list[float]]:
        """{"nll", "untouched_nll", "kl", "top1"}: lists [S] (what a heal report keeps per state)."""
        return {"nll": list(self.nll), "untouched_nll": list(self.untouched_nll), "kl": list(self.kl),
                "top1": list(self.top1)}


@torch.no_grad()
def measure_heldout(model: torch.nn.Module | None, untouched: Untouched, plan: PlanLike = None, *, mode: str = "fast",
                    head_map: Mapping[int, Sequence[int]] | None = None) -> HeldOut:
    """`model` as it is now (healed, or already patched), or shared by `plan` for the call (a SharePlan, {follower:
    anchor} or a spans string; `mode` and `head_map` as `share_attention` takes them), against `untouched` on its
    held-out ids; `model` None: the untouched model itself, from what was recorded, with no forward."""
    sharing = share_attention(model, plan, mode=mode, head_map=head_map) if plan is not None else contextlib.nullcontext()
    with sharing:
        return _measure(model, untouched)


def _measure(model: torch.nn.Module | None, untouched: Untouched) -> HeldOut:
    """Per micro-batch: the model's final hidden states, then both models' log-probabilities chunk by chunk of
    positions, compared by `damage.logprobs` (the one comparison of log-probabilities)."""
    found: dict[str, list[float]] = {"untouched_nll": [], "nll_change": [], "kl": [], "top1": []}
    kl_max, n_tokens = 0.0, 0
    starts = range(0, untouched.input_ids.shape[0], untouched.batch_size)
    for start, reference in zip(starts, untouched.hidden):
        ids = untouched.input_ids[start:start + untouched.batch_size].to(reference.device)  # [b, T]
        hidden = reference if model is None else _final_hidden(model, ids.to(parts.model_device(model)))
        hidden = hidden[:, :-1].to(reference.device)  # [b, T-1, H]: the positions with a next token
        reference, targets_all = reference[:, :-1], ids[:, 1:]  # [b, T-1, H], [b, T-1]
        sums = Sums.zeros(ids.shape[0])
        for part in chunks(targets_all.shape[1]):
            base = log_softmax(untouched.head(reference[:, part]))  # [b, c, V]
            now = base if model is None else log_softmax(parts.next_token_logits(model, hidden[:, part]))
            sums.add(compare_chunk(base, now, targets_all[:, part].to(base.device)))
        n = sums.positions
        found["untouched_nll"] += (sums.nll_baseline / n).tolist()
        found["nll_change"] += (sums.nll_change / n).tolist()
        found["kl"] += (sums.kl / n).tolist()
        found["top1"] += (sums.agree / n).tolist()
        kl_max, n_tokens = max(kl_max, sums.kl_max), n_tokens + n * ids.shape[0]
    return HeldOut(**found, kl_max=kl_max, n_tokens=n_tokens)


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


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))
