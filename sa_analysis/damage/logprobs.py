"""The one comparison of a patched model's next-token distributions with the baseline's, on the same tokens: per
sequence, summed over positions, `POSITION_CHUNK` positions at a time so that memory stays flat in the vocabulary.
The prefix replay (`damage.prefix`) and the one held-out measurement (`damage.heldout`: validate, the frontier, heal)
both compare through `compare_chunk`, chunk by chunk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .. import parts
from ..errors import UserError

if TYPE_CHECKING:
    from ..data import Tokens

POSITION_CHUNK = 128  # positions compared at a time: the temporaries are [S, chunk, V]
KEEP_BYTES = 512 * 2**20  # the baseline's log-probabilities are kept when they take at most this; else recomputed


@dataclass
class Sums:
    """Per-sequence sums over the compared positions (float64, on the CPU), and how many positions each holds."""

    nll_baseline: torch.Tensor  # [S]
    nll_change: torch.Tensor  # [S] patched - baseline, summed position by position (no cancellation of two sums)
    kl: torch.Tensor  # [S] KL(baseline || patched)
    agree: torch.Tensor  # [S] positions whose most likely next token is unchanged
    kl_max: float  # the largest KL at any one position
    positions: int  # per sequence

    @classmethod
    def zeros(cls, n_seqs: int) -> "Sums":
        zero = lambda: torch.zeros(n_seqs, dtype=torch.float64)  # noqa: E731
        return cls(zero(), zero(), zero(), zero(), 0.0, 0)

    def add(self, other: "Sums") -> None:
        """Add the sums of further positions of the same sequences."""
        self.nll_baseline += other.nll_baseline
        self.nll_change += other.nll_change
        self.kl += other.kl
        self.agree += other.agree
        self.kl_max = max(self.kl_max, other.kl_max)
        self.positions += other.positions


def compare_chunk(base: torch.Tensor, patched: torch.Tensor, targets: torch.Tensor) -> Sums:
    """Per-sequence sums of the baseline's NLL, the NLL change, KL(base || patched) and top-1 agreement over one chunk
    of positions: `base`, `patched` [S, c, V] log-probabilities at the same positions, `targets` [S, c] the next
    tokens there."""
    kl = torch.linalg.vecdot(base.exp(), base - patched)  # [S, c]
    target = targets[..., None]  # [S, c, 1]
    base_target, patched_target = base.gather(-1, target).squeeze(-1), patched.gather(-1, target).squeeze(-1)  # [S, c]
    cpu = lambda t: t.double().cpu()  # noqa: E731
    return Sums(nll_baseline=cpu(-base_target.sum(-1)), nll_change=cpu((base_target - patched_target).sum(-1)),
                kl=cpu(kl.sum(-1)), agree=cpu((base.argmax(-1) == patched.argmax(-1)).sum(-1)),
                kl_max=float(kl.max()) if kl.numel() else 0.0, positions=int(targets.shape[1]))


def chunks(n_positions: int) -> Iterator[slice]:
    """The position chunks the comparison works through."""
    for start in range(0, n_positions, POSITION_CHUNK):
        yield slice(start, start + POSITION_CHUNK)


def log_probs(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[..., V] next-token log-probabilities from the decoder's final hidden states [..., H]."""
    return log_softmax(parts.next_token_logits(model, hidden))


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] log-probabilities from logits: float32, or float64 for a float64 model (the tests' references)."""
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def token_ids(batch: Tokens) -> torch.Tensor:
    """[S, T] token ids from a TokenBatch or a tensor."""
    ids = batch.input_ids if hasattr(batch, "input_ids") else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError("Validation needs token ids of shape [sequences, tokens] with at least 2 tokens per sequence.")
    return ids
