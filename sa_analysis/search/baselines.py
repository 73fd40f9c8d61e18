"""The plans a researcher tries first, to hold the recommended plan against, at the same number of shared layers.

- `last_layers_plan`: the last k layers share (each reading the layer before the span), the rule recent pruning work
  holds up as hard to beat.
- `best_contiguous_plan`: every contiguous span of k followers measured whole on the calibration tokens (by index),
  the least damaging kept.
- `greedy_plans`: SLEB-style greedy selection: each step measures every remaining layer added to the plan so far
  (by index) and keeps the least damaging; the plans are nested, so one run gives every budget up to its largest.

All are measured with the same `PrefixRun` as the recommended plan (next-token KL on calibration tokens), so they are
chosen with the same information, and judged on the same held-out tokens (`judge_baselines`, paired intervals against
the recommendation): `frontier --baselines` puts them beside the recommendation at each budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..artefact import Record
from ..choices import CONTIGUOUS, GREEDY, LAST_K
from ..damage.heldout import Untouched, measure_heldout
from ..damage.prefix import PrefixRun
from ..planner import SharePlan
from ..planner.record import Summary
from ..progress import Say
from ..stats import paired_interval, ppl_change



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
        say(f"contiguous {first}-{first + k - 1}: KL {summary.kl:.4f}")
        if best is None or summary.kl < best[0]:
            best = (summary.kl, plan, summary)
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
            if best is None or summary.kl < best[0]:
                best = (summary.kl, layer, summary)
        assert best is not None
        chosen.append(best[1])
        plan = SharePlan(n_layers=run.n_layers, followers=sorted(chosen), model=dict(model or {}), method=f"greedy ({k})")
        plans[k] = (plan, best[2])
        say(f"greedy step {k}: + layer {best[1]} -> KL {best[0]:.4f}")
    return plans


def baseline_plans(run: PrefixRun, budgets: Sequence[int], names: Sequence[str], *, first_shareable: int = 1,
                   model: dict[str, Any] | None = None, progress: Say | None = None) -> dict[int, dict[str, SharePlan]]:
    """{budget: {method: plan}} for the baselines named (`BASELINES`), chosen on the calibration run; greedy
    selection runs once, nested, up to the largest budget."""
    plans: dict[int, dict[str, SharePlan]] = {k: {} for k in budgets}
    greedy = (greedy_plans(run, max(budgets), first_shareable, model, progress)
              if GREEDY in names and budgets else {})
    for k in budgets:
        if LAST_K in names:
            plans[k][LAST_K] = last_layers_plan(run.n_layers, k, model)
        if CONTIGUOUS in names:
            plans[k][CONTIGUOUS] = best_contiguous_plan(run, k, first_shareable, model, progress)[0]
        if GREEDY in names:
            plans[k][GREEDY] = greedy[k][0]
    return plans


@dataclass
class Calibration(Record):
    """What a baseline's method saw when it chose: the plan measured whole on the calibration tokens (nats/token)."""

    kl: float
    nll_change: float


@dataclass
class JudgedBaseline(Record):
    """One baseline plan beside the recommendation of its budget, on the same held-out tokens."""

    followers: list[int]
    aligned: list[int]  # followers reusing their anchor's heads through a head map (none for these methods)
    heldout: Summary  # the one held-out measurement (`damage.heldout`)
    vs_recommended: list[float]  # [mean, low, high] perplexity ratio - 1 against the recommendation, paired (95 %); > 0: worse
    calibration: Calibration

    RECORDS: ClassVar[dict[str, type]] = {"heldout": Summary, "calibration": Calibration}


def judge_baselines(model: torch.nn.Module, run: PrefixRun, held: Untouched, recommended: SharePlan,
                    plans: Mapping[str, SharePlan]) -> dict[str, JudgedBaseline]:
    """Each baseline plan on the held-out tokens (the one held-out measurement), beside the recommended plan of its
    budget: its held-out summary, its difference from the recommendation (held-out NLL change paired over the same
    sequences, as a perplexity ratio - 1 with its 95 % interval; positive: the baseline is worse), and what its
    method saw when it chose (KL and NLL change on the calibration tokens)."""
    ours = measure_heldout(model, held, recommended).nll_change  # [S]
    judged = {}
    for method, plan in plans.items():
        measured = measure_heldout(model, held, plan)
        mean, low, high = paired_interval(measured.nll_change, ours)
        chosen_on = run.damage(plan.anchor_of, plan.head_map)
        judged[method] = JudgedBaseline(followers=list(plan.followers), aligned=plan.aligned_followers,
                                        heldout=measured.summary(), vs_recommended=[ppl_change(v) for v in (mean, low, high)],
                                        calibration=Calibration(chosen_on.kl_mean, chosen_on.nll_mean))
    return judged
