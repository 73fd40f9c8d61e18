"""Shared Attention semantics on layer sets: anchors and spans of a follower set, which layers may share, budgets."""

from __future__ import annotations

from dataclasses import dataclass

import math
import re
from typing import Any, Iterable

import numpy as np

from .. import defaults
from ..errors import UserError
from .costs import Budget



DEFAULT_BUDGET_FRACTION = defaults.BUDGET_FRACTION


def anchors_for(followers: Iterable[int], n_layers: int) -> dict[int, int]:
    """{follower: anchor}: each follower reuses the last non-shared layer before it."""
    shared = set(followers)
    anchor_of: dict[int, int] = {}
    last = 0
    for layer in range(n_layers):
        if layer in shared:
            anchor_of[layer] = last
        else:
            last = layer
    return anchor_of


def spans_for(followers: Iterable[int]) -> list[tuple[int, int, int]]:
    """[(anchor, first_follower, last_follower)] for each maximal run of consecutive followers."""
    spans: list[tuple[int, int, int]] = []
    for layer in sorted(set(followers)):
        if spans and spans[-1][2] == layer - 1:
            spans[-1] = (spans[-1][0], spans[-1][1], layer)
        else:
            spans.append((layer - 1, layer, layer))
    return spans


def plan_cost(costs: np.ndarray, followers: Iterable[int]) -> float:
    """Total predicted cost of sharing `followers`: sum of `costs[m, anchor(m)]`."""
    anchor_of = anchors_for(followers, costs.shape[0])
    return float(sum(costs[m, a] for m, a in anchor_of.items()))


def shareable_mask(n_layers: int, first_shareable: int = 1, keep: Iterable[int] = ()) -> np.ndarray:
    """[L] bool: which layers may become followers; raises UserError on contradictory constraints."""
    keep = as_layers(keep)
    if isinstance(first_shareable, bool) or not isinstance(first_shareable, (int, np.integer)):
        raise UserError(f"first_shareable must be a layer index; got {first_shareable!r}.")
    if first_shareable < 1:
        raise UserError(f"first_shareable must be >= 1 because layer 0 can never be shared; got {first_shareable}.")
    if first_shareable >= n_layers:
        raise UserError(f"first_shareable={first_shareable} leaves no layer to share in a {n_layers}-layer model; choose a value below {n_layers}.")
    bad = [k for k in keep if not 0 <= k < n_layers]
    if bad:
        raise UserError(f"Layers to keep {bad} are outside 0..{n_layers - 1}; use layer indices of this model.")
    mask = np.zeros(n_layers, dtype=bool)
    mask[first_shareable:] = True
    mask[list(keep)] = False
    if not mask.any():
        raise UserError(f"The constraints keep every layer from {first_shareable} to {n_layers - 1}, so nothing can be shared; keep fewer layers or lower first_shareable.")
    return mask


def max_followers(mask: np.ndarray, max_span: int | None) -> int:
    """Most followers possible under the mask and span limit: each run of r shareable layers gives r - r//(M+1)."""
    total, run = 0, 0
    for ok in list(mask) + [False]:
        if ok:
            run += 1
            continue
        total += run if max_span is None else run - run // (max_span + 1)
        run = 0
    return total


def as_layers(layers: Iterable[int] | None) -> list[int]:
    out = []
    for layer in layers or ():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise UserError(f"Layer indices must be integers; got {layer!r}.")
        out.append(int(layer))
    return sorted(set(out))


def check_max_span(max_span: int | None) -> None:
    if max_span is None:
        return
    if isinstance(max_span, bool) or not isinstance(max_span, (int, np.integer)) or max_span < 1:
        raise UserError(f"max_span must be an integer >= 1 (followers per anchor); got {max_span!r}.")


def resolve_budget(budget: Budget, n_layers: int) -> int:
    """Number of layers to share: an int, or a float in (0, 1) meaning that fraction of all layers (rounded half up)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise UserError(f"The budget must be a number of layers or a fraction in (0, 1); got {budget!r}.")
    if isinstance(budget, (float, np.floating)):
        if not math.isfinite(budget) or budget < 0:
            raise UserError(f"The budget must be a number of layers or a fraction in (0, 1); got {budget}.")
        if 0 < budget < 1:
            return int(math.floor(budget * n_layers + 0.5))
        if budget != int(budget):
            raise UserError(f"The budget {budget} is neither a whole number of layers nor a fraction in (0, 1); pass e.g. 8 or 0.25.")
    budget = int(budget)
    if budget < 0:
        raise UserError(f"The budget must be >= 0 layers; got {budget}.")
    return budget


def parse_budget(text: str) -> int | float:
    """Parse a CLI budget: "8" -> 8 layers, "0.25" -> a fraction of the layers."""
    text = text.strip()
    try:
        value: int | float = int(text)
    except ValueError:
        pass
    else:
        resolve_budget(value, 1)  # a negative count is refused here, the upper bound once the model is known
        return value
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--budget must be a number of layers (e.g. 8) or a fraction in (0, 1) (e.g. 0.25); got {text!r}.") from None
    resolve_budget(value, 1_000_000)  # validates the form (range is checked against the model later)
    return value


def parse_ranges(text: str, what: str, example: str) -> list[tuple[int, int]]:
    """[(first, last)] of "a-b,c" in the order written: the one reader of ranges of numbers (layer lists, spans,
    budgets); one sentence naming `what` was unreadable and how to write it (`example`)."""
    ranges = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"Could not read {what} {part.strip()!r}; write {example}.")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UserError(f"The {what} range {part.strip()!r} runs backwards; write it as {last}-{first}.")
        ranges.append((first, last))
    return ranges


def parse_layers(text: str | None) -> list[int]:
    """Parse "0,1,31" (ranges like "28-31" allowed) into a sorted list of layer indices."""
    if text is None or not text.strip():
        return []
    ranges = parse_ranges(text, "layer list", "indices separated by commas, e.g. 0,1,31 or 28-31")
    return sorted({layer for first, last in ranges for layer in range(first, last + 1)})


@dataclass(frozen=True)
class PlanConstraints:
    """Which layers a plan may share and how: none below `first_shareable`, never those in `keep`, spans of at most
    `max_span` followers (None: no limit); `align_heads` (auto, on, off) whether followers may reuse their anchor's
    heads through a head map; `mask_change` whether a follower may take an anchor whose attention mask differs."""

    first_shareable: int = 1
    keep: tuple[int, ...] = ()
    max_span: int | None = None
    align_heads: str = "auto"
    mask_change: bool = False

    @classmethod
    def parse(cls, first_shareable: int = 1, keep: str | None = None, max_span: int | None = None,
              align_heads: str = "auto", mask_change: bool = False) -> "PlanConstraints":
        """From the command line's forms (`--keep 0,1,28-31`)."""
        from .heads import check_align_mode

        return cls(first_shareable, tuple(parse_layers(keep)), max_span, check_align_mode(align_heads), bool(mask_change))

    def as_kwargs(self) -> dict[str, Any]:
        return {"first_shareable": self.first_shareable, "keep": list(self.keep), "max_span": self.max_span,
                "align_heads": self.align_heads, "mask_change": self.mask_change}
