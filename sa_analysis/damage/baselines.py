"""The plans a researcher tries first, to hold the recommended plan against, at the same number of shared layers.

- `last_layers_plan`: the last k layers share (each reading the layer before the span), the rule recent pruning work
  holds up as hard to beat.
- `best_contiguous_plan`: every contiguous span of k followers measured whole on the calibration tokens (by index),
  the least damaging kept.
- `greedy_plans`: SLEB-style greedy selection: each step measures every remaining layer added to the plan so far
  (by index) and keeps the least damaging; the plans are nested, so one run gives every budget up to its largest.

All are measured with the same `PrefixRun` as the recommended plan (next-token KL on calibration tokens), so they are
chosen with the same information, and judged on held-out text by the caller.
"""

from __future__ import annotations

from typing import Any

from ..planner import SharePlan
from ..progress import Say
from .prefix import PrefixRun



def last_layers_plan(n_layers: int, k: int, model: dict[str, Any] | None = None) -> SharePlan:
    """Followers L-k .. L-1, all reading layer L-k-1 (by head index)."""
    return SharePlan(n_layers=n_layers, followers=list(range(n_layers - k, n_layers)), model=dict(model or {}),
                     method=f"last {k} layers")


def best_contiguous_plan(run: PrefixRun, k: int, first_shareable: int = 1, model: dict[str, Any] | None = None,
                         progress: Say | None = None) -> tuple[SharePlan, dict[str, float]]:
    """(plan, its calibration damage) of the contiguous k-span (by index) of least next-token KL, every one measured."""
    say = progress or (lambda _m: None)
    best: tuple[float, SharePlan, dict[str, float]] | None = None
    for first in range(max(1, first_shareable), run.n_layers - k + 1):
        plan = SharePlan(n_layers=run.n_layers, followers=list(range(first, first + k)), model=dict(model or {}),
                         method=f"best contiguous {k}-span")
        summary = run.damage(plan.anchor_of).summary()
        say(f"contiguous {first}-{first + k - 1}: KL {summary['kl']:.4f}")
        if best is None or summary["kl"] < best[0]:
            best = (summary["kl"], plan, summary)
    if best is None:
        raise ValueError(f"no contiguous span of {k} followers fits {run.n_layers} layers")
    return best[1], best[2]


def greedy_plans(run: PrefixRun, max_k: int, first_shareable: int = 1, model: dict[str, Any] | None = None,
                 progress: Say | None = None) -> dict[int, tuple[SharePlan, dict[str, float]]]:
    """{k: (plan, its calibration damage)} for k = 1 .. max_k by greedy selection (SLEB): at each step every layer
    not yet shared is added to the plan in turn and the whole plan measured (by index); the least damaging stays."""
    say = progress or (lambda _m: None)
    chosen: list[int] = []
    plans: dict[int, tuple[SharePlan, dict[str, float]]] = {}
    for k in range(1, max_k + 1):
        best: tuple[float, int, dict[str, float]] | None = None
        for layer in range(max(1, first_shareable), run.n_layers):
            if layer in chosen:
                continue
            trial = SharePlan(n_layers=run.n_layers, followers=sorted(chosen + [layer]))
            summary = run.damage(trial.anchor_of).summary()
            if best is None or summary["kl"] < best[0]:
                best = (summary["kl"], layer, summary)
        assert best is not None
        chosen.append(best[1])
        plan = SharePlan(n_layers=run.n_layers, followers=sorted(chosen), model=dict(model or {}), method=f"greedy ({k})")
        plans[k] = (plan, best[2])
        say(f"greedy step {k}: + layer {best[1]} -> KL {best[0]:.4f}")
    return plans
