"""Quality of a patched model against its baseline on the same held-out tokens: perplexity (with the interval of its
change), next-token KL, top-1 agreement; measured by the project's one held-out measurement (`damage.heldout`), as
the frontier and `heal` measure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from ..damage.heldout import Untouched, measure_heldout

if TYPE_CHECKING:
    from ..data import Tokens
    from ..planner.plan import PlanLike


def untouched(model: torch.nn.Module, batch: Tokens, batch_size: int = 4) -> Untouched:
    """The unpatched model recorded once on `batch` (a TokenBatch or ids [S, T]), in micro-batches of `batch_size`
    sequences, to judge any number of plans against."""
    return Untouched.record(model, batch, batch_size)


def measure_quality(model: torch.nn.Module, plan: PlanLike, base: Untouched, mode: str = "fast",
                    head_map: Mapping[int, Sequence[int]] | None = None) -> dict[str, float]:
    """Patched vs baseline on the baseline's tokens: perplexities, relative change (with its 95 % interval), mean and
    largest KL, top-1 agreement (`HeldOut.quality`). `head_map` ({follower: [anchor head per query head]}) for a
    mapping plan; a SharePlan brings its own."""
    return measure_heldout(model, base, plan, mode=mode, head_map=head_map).quality()
