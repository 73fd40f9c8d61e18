"""What each (follower, anchor) pair costs once head maps and attention masks are taken into account.

`price_pairs` starts from the report's cost by head index (`cost_matrix`), lowers it where the best head map
predicts less (`heads`), and forbids pairs whose masks differ (`masks`) unless asked not to; every plan of a run
is scored with the same prices. Measured sensitivity is applied on top (`apply_sensitivity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol

import numpy as np

from ..errors import UserError
from ..report import AttentionReport
from .costs import cost_matrix
from .heads import HeadAlignment, can_align, check_align_mode, head_alignment
from .masks import analysis_note, layer_windows, mask_note, masks_differ
from .optimal import SpanPrices

OUTPUT_COST = "output-kl"  # the cost name of a plan priced by measured output damage


@dataclass
class PairPrices:
    """[L, L] prices `costs[m, a]` of follower m reusing anchor a, and how each was reached."""

    costs: np.ndarray  # [L, L] the price the planner uses (aligned where `use_map`, inf where forbidden)
    by_index: np.ndarray  # [L, L] the report's cost sharing by head index
    use_map: np.ndarray  # [L, L] bool: the pair shares through a head map
    alignment: HeadAlignment | None
    windows: list[int | None]
    mask_forbidden: np.ndarray  # [L, L] bool: masks differ and such pairs are not allowed
    align_heads: str = "auto"
    notes: list[str] = field(default_factory=list)
    estimated: np.ndarray | None = None  # [L, L] bool: a measured-damage price estimated, not yet measured
    spans: SpanPrices | None = None  # whole-span prices (measured damage: followers of one anchor interact)

    def head_map_for(self, follower: int, anchor: int) -> list[int] | None:
        if not self.use_map[follower, anchor]:
            return None
        return [int(g) for g in self.alignment.maps[follower, anchor]]

    def mask_note(self, follower: int, anchor: int) -> str | None:
        return mask_note(follower, anchor, self.windows)


def price_pairs(report: AttentionReport, cost: str = "kl", align_heads: str = "auto",
                aligned_layers: Iterable[int] | None = None, mask_change: bool = False) -> PairPrices:
    """Prices for every pair under the head-alignment mode and the mask policy.

    align_heads: "off" shares by index; "auto" and "on" take a pair's best head map wherever it predicts less than
    index sharing (the Hungarian match includes the identity, so it never predicts more); they differ under
    measurement (`search_plans`: auto keeps a map only where it measured better). `aligned_layers` limits maps to
    those followers (None: all). mask_change: allow pairs whose masks differ (default: forbidden, said in `notes`).
    """
    check_align_mode(align_heads)
    by_index = cost_matrix(report, cost)
    n = by_index.shape[0]
    notes: list[str] = []
    alignment, use_map = None, np.zeros((n, n), dtype=bool)
    if align_heads != "off":
        if can_align(report, cost):
            alignment = head_alignment(report, cost)
            use_map = alignment.helps()
            if aligned_layers is not None:
                allowed = np.zeros(n, dtype=bool)
                allowed[list(aligned_layers)] = True
                use_map &= allowed[:, None]
        elif align_heads == "on":
            raise UserError(f"The {cost} cost is measured between heads of the same index only, so heads cannot be aligned with it; use --cost kl or cosine, or --align-heads off.")
        else:
            notes.append(f"heads shared by index: the {cost} cost holds no cross-head values to align them with")
    costs = np.where(use_map, alignment.aligned if alignment is not None else by_index, by_index)
    windows = layer_windows(report.meta.get("model", {}), n)
    differ = masks_differ(windows)
    forbidden = differ & (not mask_change)
    if differ.any():
        what = ("allowed; each such follower says what sharing does to its mask" if mask_change else
                "not allowed: a global layer following a windowed anchor becomes windowed at long context "
                "(and a windowed one following a global anchor attends beyond its window); --allow-mask-change permits them")
        notes.append(f"layer pairs whose attention masks differ (sliding window vs global) were {what}")
        seen = analysis_note(windows, report.seq_len)
        if seen:
            notes.append(seen)
    costs = np.where(forbidden, np.inf, costs)
    return PairPrices(costs=costs, by_index=by_index, use_map=use_map & ~forbidden, alignment=alignment,
                      windows=windows, mask_forbidden=forbidden, align_heads=align_heads, notes=notes)


class OutputDamage(Protocol):
    """Measured output damage the planner can price plans by (`damage.table.DamageTable`): given the similarity
    prices (for the mask rules, head maps and estimates), the prices in nats of next-token KL."""

    def prices(self, similarity: PairPrices, align: str) -> PairPrices: ...
