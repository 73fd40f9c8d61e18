"""Choose which layers share attention (Shared Attention spans) from a measured AttentionReport.

Semantics (as in the SA reference code): a shared layer, a *follower* `m`, reuses head by head the softmax of the
last non-shared layer before it, its *anchor*; layer 0 is never shared. A plan is therefore fully described by its
set of followers; its anchors and spans (maximal runs of consecutive followers) follow from it.

Predicted cost of a plan = sum over followers `m` of `C[m, anchor(m)]`, where `C` is a per-pair cost matrix
(`cost_matrix`: KL(m || a) by default, or 1 - cosine), optionally combined with measured sensitivity
(`apply_sensitivity`). `plan_spans` minimises that cost exactly by dynamic programming over "next non-shared
layer" in O(L^2 B); `seed_plan`, `adjacent_similarity_plan` and `block_influence_plan` are the baselines it is
compared with, scored with the same cost matrix. This module needs numpy only (no torch, no model).

Head maps: a follower may reuse its anchor's heads in another order (`heads`: Hungarian matching on the report's
cross-head costs); the planner prices each pair under its best map where that predicts less than sharing by index.
Masks: pairs whose attention masks differ (sliding window vs global) are forbidden unless allowed (`masks`), because
an analysis shorter than the window cannot see what sharing does to them at long context. Stability: the planner
rerun on bootstrap resamples of the analysed sequences (`stability`).

Modules: `costs` (the cost matrix, sensitivity), `heads` (head alignment), `masks` (windows per layer), `pricing`
(what each pair costs, all of the above combined), `layers` (anchors, spans, shareable layers, budgets), `optimal`
(the dynamic programme), `stability` (bootstrap), `record` (what a plan's measured damage is, as data: `Damage`,
`PlanDamage`, which `SharePlan` carries), `plan` (SharePlan), `strategies` (the optimal plan and the baselines).
"""

from .costs import COSTS, apply_sensitivity, cost_matrix
from .heads import ALIGN_MODES, HeadAlignment, head_alignment, mapped_cost
from .masks import layer_windows, mask_note
from .pricing import PairPrices, price_pairs
from .stability import DEFAULT_RESAMPLES, plan_stability
from .layers import (DEFAULT_BUDGET_FRACTION, PlanConstraints, anchors_for, max_followers, parse_budget, parse_layers, plan_cost,
                     resolve_budget, shareable_mask, spans_for)
from .optimal import optimal_followers, optimal_table
from .plan import DEFAULT_CONTEXT_LEN, PLAN_FORMAT, SharePlan, model_shape
from .strategies import (adjacent_similarity_plan, block_influence_plan, compare_plans, evaluate_plan, make_plan,
                         plan_spans, seed_plan)

__all__ = [
    "ALIGN_MODES", "DEFAULT_RESAMPLES", "HeadAlignment", "PairPrices", "head_alignment", "layer_windows", "mapped_cost",
    "mask_note", "plan_stability", "price_pairs", "COSTS", "DEFAULT_BUDGET_FRACTION", "DEFAULT_CONTEXT_LEN", "PLAN_FORMAT", "PlanConstraints", "SharePlan", "adjacent_similarity_plan",
    "anchors_for", "apply_sensitivity", "block_influence_plan", "compare_plans", "cost_matrix", "evaluate_plan",
    "make_plan", "max_followers", "model_shape", "optimal_followers", "optimal_table", "parse_budget", "parse_layers",
    "plan_cost", "plan_spans", "resolve_budget", "seed_plan", "shareable_mask", "spans_for",
]
