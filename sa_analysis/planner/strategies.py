"""Plans from a report: the optimal plan (`plan_spans`) and the baselines it is compared with (the SA seed's spans,
adjacent similarity, Block Influence), all scored with the same prices (head maps and masks included)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..report import AttentionReport
from .costs import Budget, Sensitivity, apply_sensitivity
from .heads import mapped_cost
from .layers import DEFAULT_BUDGET_FRACTION, as_layers, check_max_span, resolve_budget, shareable_mask
from .optimal import budget_target, optimal_followers
from .plan import SharePlan, model_shape
from .pricing import OUTPUT_COST, OutputDamage, PairPrices, price_pairs
from .stability import DEFAULT_RESAMPLES, plan_stability


def make_plan(report: AttentionReport, followers: Sequence[int], method: str, cost: str, costs: np.ndarray,
              constraints: Mapping[str, Any] | None = None, prices: PairPrices | None = None) -> SharePlan:
    """A SharePlan for `followers`, with each follower's predicted cost read from `costs` (true anchors), and,
    from `prices`, its head map where one was chosen, the index cost it replaced, and its mask note."""
    plan = SharePlan(n_layers=report.n_layers, followers=list(followers), model=model_shape(report), method=method,
                     cost_name=cost, constraints=dict(constraints or {}))
    plan.follower_costs = {m: float(costs[m, a]) for m, a in plan.anchor_of.items()}
    if prices is not None:
        for m, a in plan.anchor_of.items():
            heads = prices.head_map_for(m, a)
            if heads is not None:
                plan.head_map[m] = heads
                plan.index_costs[m] = float(prices.by_index[m, a])
            note = prices.mask_note(m, a)
            if note:
                plan.mask_notes[m] = note
        plan.notes = list(prices.notes)
    return plan


def evaluate_plan(plan: SharePlan, report: AttentionReport, cost: str = "kl", sensitivity: Sensitivity = None,
                  sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> SharePlan:
    """The same plan with predicted costs from this report (e.g. for a plan written by hand with `from_spans`);
    a follower with a head map is priced under that map."""
    if plan.n_layers != report.n_layers:
        raise UserError(f"The plan has {plan.n_layers} layers but the report's model has {report.n_layers}; use a plan made for this model.")
    prices = price_pairs(report, cost, align_heads="off", mask_change=True)
    costs = prices.costs.copy()
    for m, heads in plan.head_map.items():
        costs[m, plan.anchor_of[m]] = mapped_cost(report, cost, m, plan.anchor_of[m], heads)
    costs = apply_sensitivity(costs, sensitivity, sensitivity_weight, sensitivity_mode)
    scored = make_plan(report, plan.followers, plan.method, cost, costs, plan.constraints, prices)
    scored.head_map = dict(plan.head_map)
    scored.index_costs = {m: float(prices.by_index[m, plan.anchor_of[m]]) for m in plan.head_map}
    return scored


def plan_spans(
    report: AttentionReport,
    budget: Budget = None,
    max_cost: float | None = None,
    cost: str = "kl",
    first_shareable: int = 1,
    keep: Iterable[int] = (),
    max_span: int | None = None,
    sensitivity: Sensitivity = None,
    sensitivity_weight: float = 1.0,
    sensitivity_mode: str = "add",
    align_heads: str = "auto",
    aligned_layers: Iterable[int] | None = None,
    mask_change: bool = False,
    stability_resamples: int = DEFAULT_RESAMPLES,
    damage: OutputDamage | None = None,
) -> SharePlan:
    """The optimal plan: least total predicted cost for the budget, or most layers within `max_cost`.

    budget: layers to share (int) or a fraction of all layers (float in (0, 1)); default 25% of the layers.
    max_cost: instead of a budget, share as many layers as possible with total cost <= max_cost (cheapest such).
    first_shareable / keep / max_span: no follower below `first_shareable`, none in `keep`, at most `max_span`
    consecutive followers per anchor. sensitivity: measured loss combined with the cost (`apply_sensitivity`).
    align_heads / aligned_layers / mask_change: how pairs are priced (`price_pairs`): each follower takes its best
    head map where that predicts less than sharing by index; pairs whose masks differ are forbidden unless allowed.
    stability_resamples: bootstrap reruns of the planner for `plan.stability` (0: none).
    damage: measured output damage (`damage.table.DamageTable`); the plan then minimises the predicted next-token KL
    in the model's output (cost "output-kl", priced by `damage.prices`), `max_cost` is in those units, and no bootstrap is run
    (the report's resamples say nothing about measured damage).
    """
    if cost == "js":
        if max_span is not None and max_span != 1:
            raise UserError("The js cost is only measured between adjacent layers, so it needs max_span=1; use --cost kl or cosine for longer spans.")
        max_span = 1
    prices = price_pairs(report, cost, align_heads, aligned_layers, mask_change)
    if damage is not None:
        prices = damage.prices(prices, align_heads)
        cost, stability_resamples = OUTPUT_COST, 0
    sensitive = lambda raw: apply_sensitivity(raw, sensitivity, sensitivity_weight, sensitivity_mode)  # noqa: E731
    solve = lambda raw: optimal_followers(sensitive(raw), budget, max_cost, first_shareable, keep, max_span, prices.spans)  # noqa: E731
    costs = sensitive(prices.costs)
    followers = solve(prices.costs)
    constraints = {"budget": budget, "max_cost": max_cost, "first_shareable": first_shareable, "keep": as_layers(keep),
                   "max_span": max_span, "sensitivity": sensitivity is not None, "align_heads": align_heads,
                   "mask_change": bool(mask_change)}
    if sensitivity is not None:
        constraints.update(sensitivity_weight=sensitivity_weight, sensitivity_mode=sensitivity_mode)
    if aligned_layers is not None:
        constraints["aligned_layers"] = as_layers(aligned_layers)
    if damage is not None:
        constraints["damage"] = "measured"
    plan = make_plan(report, followers, "optimal", cost, costs, constraints, prices)
    note = sampling_note(report, cost, plan)
    if note:
        plan.notes.append(note)
    stability = plan_stability(report, cost, prices.costs, _quietly(solve), followers, stability_resamples)
    if stability is not None:
        plan.stability = {"resamples": stability_resamples, "same_plan": stability[1], "followers": stability[0]}
    return plan


SAMPLED_METRIC = {"kl": "kl", "cosine": "cosine_flat", "cosine_row": "cosine_row"}  # cost -> the report's metric


def sampling_note(report: AttentionReport, cost: str, plan: SharePlan) -> str | None:
    """When the report's rows were sampled: what the plan's costs rest on, and the largest standard error among the
    chosen followers' head-mean costs (None for a report over all rows)."""
    sampling = report.sampling
    se = report.layer_matrix_se(SAMPLED_METRIC[cost]) if sampling and cost in SAMPLED_METRIC else None
    if se is None or not plan.followers:
        return None
    worst = max(float(se[m, a]) for m, a in plan.anchor_of.items())
    return (f"The report's statistics are estimates from {sampling['rows']} of {sampling['of']} query rows per "
            f"sequence: the chosen followers' head-mean costs have standard errors up to {worst:.2g}; where two plans "
            f"cost about as much, measure with --rows all.")


def _quietly(solve):
    """`solve`, returning no followers where a resample makes the budget infeasible (counted as not chosen)."""
    def run(raw: np.ndarray) -> list[int]:
        try:
            return solve(raw)
        except UserError:
            return []
    return run


def seed_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", sensitivity: Sensitivity = None,
              sensitivity_weight: float = 1.0, sensitivity_mode: str = "add", align_heads: str = "off") -> SharePlan:
    """The SA reference repo's fixed choice: the `budget` layers just before the final one (which is kept).

    Llama-2-7B (32 layers), budget 8: followers 23..30, all reusing layer 22.
    """
    n_layers = report.n_layers
    n_share = _default_budget(budget, n_layers, cap=max(n_layers - 2, 0))
    if n_share > n_layers - 2:
        raise UserError(f"The seed's plan keeps layers 0 and {n_layers - 1}, so it can share at most {max(n_layers - 2, 0)} layers; lower the budget.")
    followers = list(range(n_layers - 1 - n_share, n_layers - 1))
    prices = price_pairs(report, cost, align_heads, mask_change=True)  # a fixed choice: masks are noted, not forbidden
    costs = apply_sensitivity(prices.costs, sensitivity, sensitivity_weight, sensitivity_mode)
    return make_plan(report, followers, "seed", cost, costs, {"budget": budget}, prices)


def adjacent_similarity_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", first_shareable: int = 1,
                             keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                             sensitivity_weight: float = 1.0, sensitivity_mode: str = "add", align_heads: str = "off",
                             mask_change: bool = False) -> SharePlan:
    """Greedy similarity-only grouping: share the layers most like their immediate predecessor.

    Ranks layers by `C[m, m-1]` and takes the cheapest ones (respecting the constraints), ignoring that a
    follower after another follower really reuses an earlier anchor; the predicted cost counts the true anchors.
    """
    prices = price_pairs(report, cost, align_heads, mask_change=mask_change)
    costs = apply_sensitivity(prices.costs, sensitivity, sensitivity_weight, sensitivity_mode)
    score = np.array([np.inf] + [costs[m, m - 1] for m in range(1, report.n_layers)])
    followers = _greedy(score, budget, report.n_layers, first_shareable, keep, max_span, "adjacent-similarity")
    return make_plan(report, followers, "adjacent-similarity", cost, costs,
                     {"budget": budget, "first_shareable": first_shareable, "keep": as_layers(keep), "max_span": max_span}, prices)


def block_influence_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", first_shareable: int = 1,
                         keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                         sensitivity_weight: float = 1.0, sensitivity_mode: str = "add", align_heads: str = "off",
                         mask_change: bool = False) -> SharePlan:
    """ShortGPT-style: share the layers with the lowest Block Influence (1 - cos(hidden in, hidden out))."""
    if not report.has("block_influence"):
        raise UserError("This report has no block_influence statistics, so the ShortGPT-style baseline is unavailable; re-run `sa-analyze heatmap` to capture them.")
    influence = np.asarray(report.arrays["block_influence"], dtype=float).mean(axis=0)
    prices = price_pairs(report, cost, align_heads, mask_change=mask_change)
    costs = apply_sensitivity(prices.costs, sensitivity, sensitivity_weight, sensitivity_mode)
    followers = _greedy(influence, budget, report.n_layers, first_shareable, keep, max_span, "block-influence")
    return make_plan(report, followers, "block-influence", cost, costs,
                     {"budget": budget, "first_shareable": first_shareable, "keep": as_layers(keep), "max_span": max_span}, prices)


def _default_budget(budget: Budget, n_layers: int, cap: int) -> int:
    if budget is None:
        return min(resolve_budget(DEFAULT_BUDGET_FRACTION, n_layers), cap)
    return resolve_budget(budget, n_layers)


def _greedy(score: np.ndarray, budget: Budget, n_layers: int, first_shareable: int, keep: Iterable[int],
            max_span: int | None, name: str) -> list[int]:
    """Take layers in order of increasing score (ties: deeper first), skipping those that break max_span."""
    mask = shareable_mask(n_layers, first_shareable, keep)
    check_max_span(max_span)
    n_share, _ = budget_target(budget, None, n_layers, mask, max_span)
    order = sorted((m for m in range(n_layers) if mask[m]), key=lambda m: (float(score[m]), -m))
    chosen: set[int] = set()
    for m in order:
        if len(chosen) == n_share:
            break
        if max_span is None or _run_length(chosen | {m}, m) <= max_span:
            chosen.add(m)
    if len(chosen) < n_share:
        raise UserError(f"The {name} greedy choice cannot place {n_share} followers within max_span={max_span}; raise max_span or lower the budget.")
    return sorted(chosen)


def _run_length(followers: set[int], layer: int) -> int:
    lo, hi = layer, layer
    while lo - 1 in followers:
        lo -= 1
    while hi + 1 in followers:
        hi += 1
    return hi - lo + 1


def compare_plans(report: AttentionReport, optimal: SharePlan, cost: str | None = None, first_shareable: int = 1,
                  keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                  sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> dict[str, SharePlan | str]:
    """The optimal plan and the baselines with the same number of shared layers: {method: plan, or why not}.

    The baselines choose layers their own way and take the optimal plan's pricing (its --align-heads mode, and its
    mask policy for the greedy ones); the seed plan ignores the constraints (it is a fixed choice); the greedy
    baselines respect them.
    """
    cost = cost or optimal.cost_name or "kl"
    n = optimal.n_shared
    keep = as_layers(keep)
    align = optimal.constraints.get("align_heads", "off")
    common = dict(cost=cost, sensitivity=sensitivity, sensitivity_weight=sensitivity_weight, sensitivity_mode=sensitivity_mode,
                  align_heads=align)
    constrained = dict(common, first_shareable=first_shareable, keep=keep, max_span=max_span,
                       mask_change=bool(optimal.constraints.get("mask_change", False)))
    out: dict[str, SharePlan | str] = {"optimal": optimal}
    for name, make in (("seed", lambda: seed_plan(report, n, **common)),
                       ("adjacent-similarity", lambda: adjacent_similarity_plan(report, n, **constrained)),
                       ("block-influence", lambda: block_influence_plan(report, n, **constrained))):
        try:
            out[name] = make()
        except UserError as exc:
            out[name] = str(exc)
    return out
