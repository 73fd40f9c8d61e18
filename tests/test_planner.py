"""The planner: exact optimality (brute force), known answers, savings arithmetic, plan files, errors, and the CLI.

Reports are built by hand (`AttentionReport(meta, arrays)`): no torch, no model.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any folder without installing

from sa_analysis.errors import UserError  # noqa: E402
from sa_analysis.planner import (  # noqa: E402
    PLAN_FORMAT, SharePlan, adjacent_similarity_plan, anchors_for, apply_sensitivity, block_influence_plan,
    compare_plans, cost_matrix, evaluate_plan, max_followers, optimal_followers, parse_budget, parse_layers,
    plan_cost, plan_spans, resolve_budget, seed_plan, shareable_mask, spans_for,
)
from sa_analysis.report import AttentionReport  # noqa: E402

LLAMA2_7B = {"name": "meta-llama/Llama-2-7b-hf", "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "head_dim": 128, "hidden_size": 4096}


# ----- fake reports -----------------------------------------------------------------------------------------
def fake_report(kl: np.ndarray, *, n_heads: int = 4, n_seqs: int = 2, model: dict | None = None,
                block_influence: np.ndarray | None = None, seed: int = 0) -> AttentionReport:
    """A report whose head-mean KL is `kl` (cosine derived from it), with every array the planner reads."""
    n = kl.shape[0]
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1e-3, size=(n_seqs, n, n))
    kl_layers = np.stack([kl] * n_seqs) + noise - noise.mean(axis=0)  # mean over sequences is exactly `kl`
    cos = np.exp(-np.where(np.isfinite(kl), kl, 50.0))
    arrays = {
        "kl_layers": kl_layers,
        "cosine_flat_layers": np.stack([cos] * n_seqs),
        "cosine_row_layers": np.stack([np.sqrt(cos)] * n_seqs),
        "js_adjacent": np.stack([np.repeat(np.diagonal(kl, -1)[:, None] / 2, n_heads, axis=1)] * n_seqs),
    }
    if block_influence is not None:
        arrays["block_influence"] = np.stack([block_influence] * n_seqs)
    info = {"name": "fake-llama", "n_layers": n, "n_heads": n_heads, "n_kv_heads": 2, "head_dim": 16, "hidden_size": 64}
    info.update(model or {})
    info["n_layers"] = n
    return AttentionReport(meta={"model": info}, arrays=arrays)


def random_costs(n: int, seed: int, inf_fraction: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    costs = rng.gamma(2.0, 1.0, size=(n, n))
    if inf_fraction:
        costs[rng.random((n, n)) < inf_fraction] = np.inf
    np.fill_diagonal(costs, 0.0)
    return costs


def identical_block_kl(n: int = 12, block: tuple[int, int] = (5, 7)) -> np.ndarray:
    """KL around 1 everywhere, nearly 0 between the layers of `block` (inclusive)."""
    rng = np.random.default_rng(1)
    kl = 1.0 + rng.random((n, n))
    lo, hi = block
    kl[lo : hi + 1, lo : hi + 1] = 0.001
    np.fill_diagonal(kl, 0.0)
    return kl


# ----- brute force ------------------------------------------------------------------------------------------
def _max_run(followers: tuple[int, ...]) -> int:
    best = run = 0
    prev = None
    for m in followers:
        run = run + 1 if prev is not None and m == prev + 1 else 1
        best, prev = max(best, run), m
    return best


def brute_minimum(costs: np.ndarray, mask: np.ndarray, max_span: int | None, k: int) -> float | None:
    """Least plan cost over all k-subsets of shareable layers (None: no subset meets max_span)."""
    candidates = [m for m in range(costs.shape[0]) if mask[m]]
    best = None
    for followers in itertools.combinations(candidates, k):
        if max_span is not None and followers and _max_run(followers) > max_span:
            continue
        value = plan_cost(costs, followers)
        best = value if best is None or value < best else best
    return best


CONSTRAINTS = [
    dict(),
    dict(keep=(3,)),
    dict(first_shareable=3),
    dict(max_span=2),
    dict(first_shareable=2, keep=(5, 9), max_span=3),
    dict(max_span=1, keep=(4,)),
]


@pytest.mark.parametrize("n", [5, 8, 11, 12])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("constraints", CONSTRAINTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "none")
def test_dp_equals_brute_force_for_every_budget(n, seed, constraints):
    constraints = {k: v for k, v in constraints.items() if k != "keep"} | {"keep": [k for k in constraints.get("keep", ()) if k < n]}
    costs = random_costs(n, seed, inf_fraction=0.1 if seed == 2 else 0.0)
    mask = shareable_mask(n, constraints.get("first_shareable", 1), constraints["keep"])
    for budget in range(n):
        expected = brute_minimum(costs, mask, constraints.get("max_span"), budget)
        if expected is None or not np.isfinite(expected):
            with pytest.raises(UserError):
                optimal_followers(costs, budget=budget, **constraints)
            continue
        followers = optimal_followers(costs, budget=budget, **constraints)
        assert len(followers) == budget
        assert all(mask[m] for m in followers)
        if constraints.get("max_span"):
            assert _max_run(tuple(followers)) <= constraints["max_span"]
        assert plan_cost(costs, followers) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("n", [6, 10, 12])
@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("constraints", CONSTRAINTS[:4], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "none")
def test_threshold_mode_equals_brute_force(n, seed, constraints):
    costs = random_costs(n, seed, inf_fraction=0.05)
    mask = shareable_mask(n, constraints.get("first_shareable", 1), constraints.get("keep", ()))
    minima = [brute_minimum(costs, mask, constraints.get("max_span"), k) for k in range(n)]
    finite = sorted(v for v in minima if v is not None and np.isfinite(v))
    for max_cost in [0.0, 0.5, *finite[1:], finite[-1] * 2]:  # exact minima hit the boundary on purpose
        k_best = max(k for k, v in enumerate(minima) if v is not None and v <= max_cost * (1 + 1e-9) + 1e-12)
        followers = optimal_followers(costs, max_cost=max_cost, **constraints)
        assert len(followers) == k_best
        assert plan_cost(costs, followers) == pytest.approx(minima[k_best], rel=1e-12, abs=1e-12)
        assert plan_cost(costs, followers) <= max_cost * (1 + 1e-9) + 1e-12


def test_plan_spans_on_report_matches_raw_optimiser():
    kl = random_costs(10, 7)
    report = fake_report(kl)
    plan = plan_spans(report, budget=4, max_span=2, keep=[9])
    assert plan.followers == optimal_followers(cost_matrix(report, "kl"), budget=4, max_span=2, keep=[9])
    assert plan.total_cost == pytest.approx(plan_cost(cost_matrix(report, "kl"), plan.followers))
    assert plan.method == "optimal" and plan.cost_name == "kl"
    assert plan.constraints["max_span"] == 2 and plan.constraints["keep"] == [9]


def test_ties_are_deterministic():
    costs = np.zeros((8, 8))
    first = optimal_followers(costs, budget=3)
    assert all(optimal_followers(costs.copy(), budget=3) == first for _ in range(3))
    assert first == [5, 6, 7]  # equal costs: followers go as deep as possible


# ----- known answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cost", ["kl", "cosine", "cosine_row"])
def test_nearly_identical_layers_are_shared(cost):
    report = fake_report(identical_block_kl(12, (5, 7)))
    plan = plan_spans(report, budget=2, cost=cost)
    assert plan.followers == [6, 7]
    assert plan.anchor_of == {6: 5, 7: 5}
    assert plan.spans == [(5, 6, 7)]
    assert plan.total_cost == pytest.approx(sum(cost_matrix(report, cost)[m, 5] for m in (6, 7)))


def test_threshold_mode_on_report_picks_the_cheap_block():
    report = fake_report(identical_block_kl(12, (5, 7)))
    plan = plan_spans(report, max_cost=0.01)
    assert plan.followers == [6, 7]
    assert plan_spans(report, max_cost=0.0).followers == []


def test_js_cost_uses_adjacent_pairs_only():
    report = fake_report(identical_block_kl(12, (5, 7)))
    costs = cost_matrix(report, "js")
    assert np.isfinite(costs[6, 5]) and np.isinf(costs[7, 5])
    plan = plan_spans(report, budget=2, cost="js")
    assert plan.constraints["max_span"] == 1
    assert max(last - first + 1 for _, first, last in plan.spans) == 1
    with pytest.raises(UserError, match="adjacent"):
        plan_spans(report, budget=2, cost="js", max_span=3)


def test_seed_plan_llama2_7b():
    report = fake_report(random_costs(32, 0), model=LLAMA2_7B)
    plan = seed_plan(report, 8)
    assert plan.followers == list(range(23, 31))
    assert plan.non_shared_layers() == list(range(0, 23)) + [31]
    assert plan.spans == [(22, 23, 30)]
    assert set(plan.anchor_of.values()) == {22}
    assert seed_plan(report, 4).non_shared_layers() == list(range(0, 27)) + [31]  # the README's 27-30 example
    assert seed_plan(report).n_shared == 8  # default: 25% of 32


def test_adjacent_similarity_ignores_chaining():
    kl = np.full((6, 6), 5.0)
    np.fill_diagonal(kl, 0.0)
    kl[2, 1] = kl[3, 2] = 0.1  # 2 is like 1 and 3 like 2, but 3 is far from 1
    kl[3, 1] = 9.0
    kl[5, 4] = 0.5
    report = fake_report(kl)
    greedy = adjacent_similarity_plan(report, 2)
    assert greedy.followers == [2, 3]
    assert greedy.total_cost == pytest.approx(0.1 + 9.0)  # 3 really reuses layer 1
    optimal = plan_spans(report, budget=2)
    assert optimal.total_cost < greedy.total_cost
    assert optimal.total_cost == pytest.approx(0.6)  # {2, 5}: 0.1 + 0.5
    assert adjacent_similarity_plan(report, 2, max_span=1).followers == [3, 5]  # tie 2 vs 3: deeper first


def test_block_influence_plan_takes_lowest_influence():
    bi = np.array([0.9, 0.5, 0.05, 0.4, 0.01, 0.3, 0.02, 0.8])
    report = fake_report(random_costs(8, 0), block_influence=bi)
    plan = block_influence_plan(report, 3)
    assert plan.followers == [2, 4, 6]
    assert plan.total_cost == pytest.approx(plan_cost(cost_matrix(report), [2, 4, 6]))
    assert block_influence_plan(report, 3, keep=[4]).followers == [2, 5, 6]


def test_compare_plans_scores_everything_with_one_cost_matrix():
    report = fake_report(random_costs(10, 2), block_influence=np.linspace(1, 0, 10))
    optimal = plan_spans(report, budget=3)
    plans = compare_plans(report, optimal)
    assert list(plans) == ["optimal", "seed", "adjacent-similarity", "block-influence"]
    costs = cost_matrix(report)
    for plan in plans.values():
        assert plan.n_shared == 3
        assert plan.total_cost == pytest.approx(plan_cost(costs, plan.followers))
        assert plan.total_cost >= optimal.total_cost - 1e-12
    without_bi = compare_plans(fake_report(random_costs(10, 2)), optimal)
    assert isinstance(without_bi["block-influence"], str) and "block_influence" in without_bi["block-influence"]


# ----- sensitivity ------------------------------------------------------------------------------------------
def test_sensitivity_add_moves_the_plan():
    report = fake_report(identical_block_kl(12, (5, 7)))
    assert plan_spans(report, budget=2).followers == [6, 7]
    moved = plan_spans(report, budget=2, sensitivity={6: 10.0, 7: 10.0})
    assert 6 not in moved.followers and 7 not in moved.followers
    assert moved.constraints["sensitivity"] is True
    # a tiny weight leaves similarity in charge
    assert plan_spans(report, budget=2, sensitivity={6: 10.0}, sensitivity_weight=1e-6).followers == [6, 7]


def test_sensitivity_forms():
    costs = np.arange(16, dtype=float).reshape(4, 4)
    per_follower = apply_sensitivity(costs, {2: 1.0})
    assert np.array_equal(per_follower[2], costs[2] + 1.0) and np.array_equal(per_follower[3], costs[3])
    pair = apply_sensitivity(costs, {(3, 1): 5.0, 3: 1.0}, weight=2.0)
    assert pair[3, 1] == costs[3, 1] + 10.0 and pair[3, 0] == costs[3, 0] + 2.0
    arr = np.full(4, np.nan)
    arr[1] = 7.0
    replaced = apply_sensitivity(costs, arr, mode="replace")
    assert np.all(replaced[1] == 7.0) and np.array_equal(replaced[2], costs[2])
    full = np.zeros((4, 4))
    full[3, 2] = np.inf
    assert np.isinf(apply_sensitivity(costs, full)[3, 2])
    assert apply_sensitivity(costs, None) is costs


def test_sensitivity_errors():
    costs = np.zeros((4, 4))
    for bad in [dict(sensitivity=np.zeros(3)), dict(sensitivity={9: 1.0}), dict(sensitivity={(1, 2, 3): 1.0}),
                dict(sensitivity={1: 1.0}, mode="mul"), dict(sensitivity={1: 1.0}, weight=-1.0)]:
        with pytest.raises(UserError):
            apply_sensitivity(costs, **bad)


# ----- savings ----------------------------------------------------------------------------------------------
def test_savings_llama2_7b_by_hand():
    plan = SharePlan(n_layers=32, followers=list(range(23, 31)), model=LLAMA2_7B)
    s = plan.savings(context_len=4096)
    k_bytes_per_layer = 32 * 128 * 2  # Hkv * d * 2 bytes (bf16) = 8192
    assert s["k_cache_bytes_saved_per_token"] == 8 * k_bytes_per_layer == 65536
    assert s["kv_cache_bytes_per_token"] == 32 * 2 * k_bytes_per_layer == 524288  # 512 KiB, the known Llama-2-7B figure
    assert s["kv_cache_fraction_saved"] == pytest.approx(8 / 64)
    assert s["k_cache_bytes_saved_at_context"] == 65536 * 4096  # 256 MiB per 4k-token sequence
    assert s["qk_proj_flops_saved_per_token"] == 8 * 2 * 4096 * (4096 + 4096) == 536_870_912
    assert s["attn_proj_flops_per_token"] == 32 * 2 * 4096 * (4 * 4096) == 4_294_967_296
    assert s["attn_proj_fraction_saved"] == pytest.approx(0.125)
    assert s["score_flops_saved_per_token"] == 8 * 2 * 32 * 128 * 4096 == 268_435_456
    assert s["score_fraction_saved"] == pytest.approx(0.25)


def test_savings_gqa_shape_and_unknown_shape():
    smollm = {"name": "smollm2-135m", "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "hidden_size": 576}
    s = SharePlan(n_layers=30, followers=[20, 21, 22], model=smollm).savings(context_len=256, bytes_per_element=4)
    assert s["k_cache_bytes_saved_per_token"] == 3 * 3 * 64 * 4
    assert s["qk_proj_flops_saved_per_token"] == 3 * 2 * 576 * (9 * 64 + 3 * 64)
    assert s["attn_proj_fraction_saved"] == pytest.approx(3 * (9 + 3) / (30 * 2 * (9 + 3)))
    assert s["score_flops_saved_per_token"] == 3 * 2 * 9 * 64 * 256
    bare = SharePlan.from_spans("5-6", 12).savings()
    assert bare["kv_cache_fraction_saved"] == pytest.approx(2 / 24)
    assert "qk_proj_flops_saved_per_token" not in bare


# ----- SharePlan structure, files, from_spans ---------------------------------------------------------------
def test_anchors_and_spans_from_followers():
    assert anchors_for([2, 3, 5], 8) == {2: 1, 3: 1, 5: 4}
    assert spans_for([5, 2, 3]) == [(1, 2, 3), (4, 5, 5)]
    plan = SharePlan(n_layers=8, followers=[5, 3, 2, 3])
    assert plan.followers == [2, 3, 5] and plan.non_shared_layers() == [0, 1, 4, 6, 7]
    assert plan.spans_spec() == "2-3,5" and plan.is_shared(3) and not plan.is_shared(4)
    assert plan.total_cost is None and "3/8 layers shared" in plan.summary()


def test_empty_plan():
    plan = SharePlan.empty(6, {"name": "x"})
    assert plan.followers == [] and plan.spans == [] and plan.non_shared_layers() == list(range(6))
    assert plan.total_cost == 0.0 and plan.savings()["kv_cache_fraction_saved"] == 0
    assert SharePlan.from_dict(plan.to_dict()).followers == []


def test_save_load_round_trip(tmp_path):
    kl = random_costs(10, 5)
    kl[8, 6] = np.inf  # the seed plan below pays an infinite cost: it must survive plain JSON
    report = fake_report(kl)
    for plan in (plan_spans(report, budget=3, max_span=2, keep=[4]), seed_plan(report, 2)):
        path = plan.save(tmp_path / f"{plan.method}.json")
        data = json.loads(path.read_text())  # strict JSON
        assert data["format"] == PLAN_FORMAT and data["non_shared_layers"] == plan.non_shared_layers()
        loaded = SharePlan.load(path)
        assert loaded == plan
        assert loaded.anchor_of == plan.anchor_of and loaded.spans == plan.spans
        assert loaded.total_cost == plan.total_cost
    assert data["total_cost"] == "inf"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_load_rejects_bad_files(tmp_path):
    good = SharePlan.from_spans("3-4", 8).to_dict()
    cases = {
        "missing.json": None,
        "garbage.json": "{not json",
        "report.json": json.dumps({"format": "sa-analysis/attention-report"}),
        "newer.json": json.dumps(good | {"version": 99}),
        "damaged.json": json.dumps({k: v for k, v in good.items() if k != "followers"}),
        "anchors.json": json.dumps(good | {"anchor_of": {"3": 1, "4": 2}}),
        "range.json": json.dumps(good | {"followers": [0, 3], "anchor_of": {}}),
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as info:
            SharePlan.load(tmp_path / name)
        assert "\n" not in str(info.value)


def test_from_spans_parses_seed_examples():
    plan = SharePlan.from_spans("23-26", 32, LLAMA2_7B)
    assert plan.followers == [23, 24, 25, 26] and plan.anchor_of[26] == 22
    two = SharePlan.from_spans(" 23-25 , 27-30 ", 32)
    assert two.spans == [(22, 23, 25), (26, 27, 30)]
    assert SharePlan.from_spans("5", 8).spans == [(4, 5, 5)]
    assert SharePlan.from_spans(two.spans_spec(), 32).followers == two.followers
    seed = SharePlan.from_spans("23-26,27-30", 32)  # the seed README's two spans together: all reuse layer 22
    assert seed.followers == list(range(23, 31)) and {seed.anchor_of[m] for m in seed.followers} == {22}


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("0-3", "layer 0"), ("23-40", "past the last layer"), ("26-23", "backwards"),
    ("a-b", "Could not read"), ("3-5,5-6", "more than one span"),
])
def test_from_spans_errors(spec, message):
    with pytest.raises(UserError, match=message):
        SharePlan.from_spans(spec, 32)


def test_evaluate_plan_adds_costs_to_a_manual_plan():
    report = fake_report(identical_block_kl(12, (5, 7)))
    plan = evaluate_plan(SharePlan.from_spans("6-7", 12), report)
    assert plan.total_cost == pytest.approx(0.002)
    with pytest.raises(UserError, match="layers"):
        evaluate_plan(SharePlan.from_spans("6-7", 14), report)


# ----- parsing helpers and every UserError path -------------------------------------------------------------
def test_budget_and_layer_parsing():
    assert parse_budget("3") == 3 and parse_budget("0.25") == 0.25
    assert resolve_budget(0.25, 30) == 8 and resolve_budget(0.25, 32) == 8 and resolve_budget(3.0, 30) == 3
    assert parse_layers("0,1,31") == [0, 1, 31] and parse_layers("28-30, 2") == [2, 28, 29, 30] and parse_layers(None) == []
    for bad in ["abc", "1.5", "-1", "nan"]:
        with pytest.raises(UserError):
            parse_budget(bad)
    for bad in ["1;2", "5-3"]:
        with pytest.raises(UserError):
            parse_layers(bad)


def test_max_followers():
    assert max_followers(np.array([False] + [True] * 7), None) == 7
    assert max_followers(np.array([False] + [True] * 7), 1) == 4
    assert max_followers(np.array([False, True, True, False, True, True, True]), 2) == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=12), "exceeds"),
    (dict(budget=5, keep=[1, 2, 3, 4, 5, 6, 7]), "exceeds"),
    (dict(keep=list(range(1, 12))), "nothing can be shared"),
    (dict(first_shareable=12), "leaves no layer"),
    (dict(first_shareable=0), "layer 0"),
    (dict(keep=[40]), "outside"),
    (dict(max_cost=-1.0), "--max-cost"),
    (dict(budget=3, max_cost=1.0), "not both"),
    (dict(budget=8, max_span=1), "max_span=1"),
    (dict(budget=3, max_span=0), "max_span"),
    (dict(budget=1.5), "neither"),
    (dict(budget=-2), ">= 0"),
    (dict(budget="3"), "number of layers"),
    (dict(budget=3, cost="euclid"), "Unknown cost"),
])
def test_user_errors(kwargs, message):
    report = fake_report(random_costs(12, 0))
    with pytest.raises(UserError, match=message) as info:
        plan_spans(report, **kwargs)
    text = str(info.value)
    assert "\n" not in text and text.endswith(".")


def test_user_errors_of_baselines_and_infinite_costs():
    report = fake_report(random_costs(8, 0))
    with pytest.raises(UserError, match="block_influence"):
        block_influence_plan(report, 2)
    with pytest.raises(UserError, match="at most 6"):
        seed_plan(report, 7)
    with pytest.raises(UserError, match="greedy"):
        blocked = np.ones((4, 4))
        blocked[2, 1] = 0.0  # greedy takes 2 first; then 1 and 3 both break max_span=1 (the answer is {1, 3})
        adjacent_similarity_plan(fake_report(blocked), 2, max_span=1)
    all_inf = np.full((5, 5), np.inf)
    np.fill_diagonal(all_inf, 0)
    with pytest.raises(UserError, match="infinite"):
        plan_spans(fake_report(all_inf), budget=1)


def test_default_budget_is_a_quarter_capped_by_constraints():
    report = fake_report(random_costs(12, 0))
    assert plan_spans(report).n_shared == 3
    assert plan_spans(report, first_shareable=10).n_shared == 2


# ----- figure -----------------------------------------------------------------------------------------------
def test_plot_plan_over_heatmap(tmp_path):
    from sa_analysis.plots import heatmap_metric_for, plot_plan_over_heatmap

    kl = identical_block_kl(16, (5, 9))
    kl[12, 3] = np.inf
    report = fake_report(kl)
    plan = plan_spans(report, budget=5, max_span=3)
    path = tmp_path / "plan.png"
    fig = plot_plan_over_heatmap(report, plan, heatmap_metric_for(report, "kl"), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert heatmap_metric_for(report, "js") == "kl"
    # what is drawn: per span, the block [anchor..last follower] and the followers' column of paid cells
    ax = fig.axes[0]
    boxes = sorted((round(r.get_x() + 0.5), round(r.get_y() + 0.5), round(r.get_width()), round(r.get_height()))
                   for r in ax.patches)
    expected = sorted([(a, a, l - a + 1, l - a + 1) for a, f, l in plan.spans] +
                      [(a, f, 1, l - f + 1) for a, f, l in plan.spans])
    assert boxes == expected
    heat, grey = (image.get_array() for image in ax.images)  # the lower triangle, then the infinite cells
    shown = ~np.ma.getmaskarray(np.ma.masked_invalid(heat))
    assert shown[6, 5] and not shown[5, 6] and not shown[5, 5]  # only reused layer < follower is drawn
    assert not shown[12, 3]  # the infinite cell is not on the colour scale ...
    grey_cells = ~np.ma.getmaskarray(np.ma.masked_invalid(grey))
    assert grey_cells[12, 3] and grey_cells.sum() == 1  # ... but drawn grey, alone
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-1] == "infinite (masks differ)" and str(plan.n_shared) in ax.get_title()


# ----- CLI --------------------------------------------------------------------------------------------------
@pytest.fixture
def cli_app():
    from cli.main import app

    return app


@pytest.fixture
def saved_report(tmp_path):
    report = fake_report(identical_block_kl(12, (5, 7)), block_influence=np.linspace(1, 0.1, 12))
    json_path, _ = report.save(tmp_path / "report")
    return json_path


def _run(app, args):
    """Invoke `sa-analyze recommend-spans ...` (the app has several commands: heatmap is always registered)."""
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["recommend-spans", *args])


def test_cli_recommend_from_report(cli_app, saved_report, tmp_path):
    out = tmp_path / "out"
    result = _run(cli_app, ["--report", str(saved_report), "--budget", "2", "--out", str(out), "--keep", "0,11"])
    assert result.exit_code == 0, result.output
    plan = SharePlan.load(out / "plan.json")
    assert plan.followers == [6, 7]
    assert (out / "plan.png").stat().st_size > 0
    for text in ("layers not shared", "seed", "adjacent-similarity", "block-influence", "K-cache"):
        assert text in result.output


def test_cli_threshold_fraction_and_cost_options(cli_app, saved_report, tmp_path):
    result = _run(cli_app, ["-r", str(saved_report), "--max-cost", "0.01", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert SharePlan.load(tmp_path / "a" / "plan.json").followers == [6, 7]
    result = _run(cli_app, ["-r", str(saved_report), "--budget", "0.25", "--cost", "js", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert SharePlan.load(tmp_path / "b" / "plan.json").n_shared == 3


@pytest.mark.parametrize("args, message", [
    (["--budget", "40"], "exceeds"),
    (["--budget", "lots"], "--budget"),
    (["--budget", "2", "--max-cost", "1"], "not both"),
    (["--cost", "l2"], "Unknown --cost"),
    (["--keep", "1;2"], "layer list"),
    (["--model", "llama2-7b"], "does not match"),
])
def test_cli_bad_input_exits_1_without_plan(cli_app, saved_report, tmp_path, args, message):
    out = tmp_path / "out"
    result = _run(cli_app, ["--report", str(saved_report), "--out", str(out), *args])
    assert result.exit_code == 1
    error = result.stderr.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (out / "plan.json").exists()


def test_cli_model_matching_report_is_accepted(cli_app, saved_report, tmp_path):
    result = _run(cli_app, ["-r", str(saved_report), "-m", "FAKE-LLAMA", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output


def test_cli_captures_when_no_report(cli_app, tmp_path, monkeypatch):
    calls = {}

    def measure_heatmap(source, text, capture, *, out, **shown):
        calls.update(source=source, text=text, capture=capture, out=out)
        return None, fake_report(identical_block_kl(12, (5, 7))), []  # no model at hand: planned by similarity

    import sa_analysis.pipeline.heatmap as heatmap_job

    monkeypatch.setattr(heatmap_job, "measure_heatmap", measure_heatmap)  # where run_plan measures a model it has no report of
    result = _run(cli_app, ["--budget", "2", "--seq-len", "64", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert calls["source"].model == "smollm2-135m" and calls["text"].seq_len == 64 and calls["out"] == tmp_path / "o"
    assert SharePlan.load(tmp_path / "o" / "plan.json").followers == [6, 7]
    assert "attention similarity alone" in result.output  # the weaker predictor says so


def test_a_plan_that_repeats_a_follower_says_so(tmp_path):
    import json

    plan = SharePlan.from_spans("2-3", 6).to_dict()
    plan["followers"] = [2, 3, 3]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match="lists follower 3 more than once"):
        SharePlan.load(path)


# ----- head alignment ----------------------------------------------------------------------------------------
def permuted_report(n_layers: int = 4, n_heads: int = 4, perm=(2, 0, 3, 1), off: float = 2.0) -> AttentionReport:
    """Cross-head KL where follower head h of layer m matches anchor head perm[h] of layer m-1 exactly (KL 0) and
    every other head pair costs `off`: sharing by index costs `off` per head, the aligned map costs 0."""
    kl_mean = np.full((n_layers, n_heads, n_layers, n_heads), off)
    for m in range(1, n_layers):
        for h in range(n_heads):
            kl_mean[m, h, m - 1, perm[h]] = 0.0
    for l in range(n_layers):
        kl_mean[l, :, l, :] = off
        kl_mean[l, np.arange(n_heads), l, np.arange(n_heads)] = 0.0
    head_mean = np.diagonal(kl_mean, axis1=1, axis2=3).mean(-1)  # [L, L] index-matched
    report = fake_report(head_mean, n_heads=n_heads)
    report.arrays["kl_mean"] = kl_mean
    return report


def test_hungarian_recovers_a_known_head_permutation():
    from sa_analysis.planner import head_alignment

    alignment = head_alignment(permuted_report())
    assert alignment.maps[2, 1].tolist() == [2, 0, 3, 1]
    assert alignment.aligned[2, 1] == 0.0 and alignment.by_index[2, 1] == pytest.approx(2.0)
    assert alignment.helps()[2, 1] and not alignment.helps()[1, 1]


def test_planner_takes_head_maps_where_they_predict_less():
    report = permuted_report()
    aligned = plan_spans(report, budget=1, stability_resamples=0)
    by_index = plan_spans(report, budget=1, align_heads="off", stability_resamples=0)
    follower = aligned.followers[0]
    assert aligned.head_map == {follower: [2, 0, 3, 1]} and aligned.total_cost == 0.0
    assert aligned.index_costs == {follower: pytest.approx(2.0)}
    assert by_index.head_map == {} and by_index.total_cost == pytest.approx(2.0)
    again = SharePlan.from_dict(json.loads(json.dumps(aligned.to_dict())))
    assert again.head_map == aligned.head_map and again.index_costs == aligned.index_costs


def test_planner_keeps_index_sharing_where_a_map_gains_nothing():
    report = permuted_report(perm=(0, 1, 2, 3))  # heads already aligned by index
    plan = plan_spans(report, budget=2, stability_resamples=0)
    assert plan.head_map == {} and plan.total_cost == pytest.approx(0.0, abs=1e-12)


def test_aligned_layers_limit_where_maps_are_used_and_js_cannot_align():
    report = permuted_report()
    plan = plan_spans(report, budget=1, aligned_layers=[], stability_resamples=0)
    assert plan.head_map == {}
    with pytest.raises(UserError, match="cannot be aligned"):
        plan_spans(report, budget=1, cost="js", align_heads="on")
    auto = plan_spans(report, budget=1, cost="js", stability_resamples=0)
    assert auto.head_map == {} and any("by index" in note for note in auto.notes)
    with pytest.raises(UserError, match="auto, on or off"):
        plan_spans(report, budget=1, align_heads="yes")


def test_evaluate_plan_prices_a_given_head_map():
    report = permuted_report()
    plan = SharePlan(4, [2], head_map={2: [2, 0, 3, 1]})
    assert evaluate_plan(plan, report).total_cost == 0.0
    assert evaluate_plan(SharePlan(4, [2]), report).total_cost == pytest.approx(2.0)


def test_bad_head_maps_in_plan_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not share"):
        SharePlan(4, [2], head_map={3: [0, 1, 2, 3]})
    with pytest.raises(UserError, match="4 query heads"):
        SharePlan(4, [2], model={"n_heads": 4}, head_map={2: [0, 1]})
    data = SharePlan(4, [2]).to_dict()
    data["head_map"] = {"2": "abc"}
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="malformed head_map"):
        SharePlan.load(tmp_path / "plan.json")


# ----- sliding windows ---------------------------------------------------------------------------------------------
GEMMA3_270M = {"name": "gemma-3-270m", "n_layers": 18, "n_heads": 4, "n_kv_heads": 1, "head_dim": 256, "hidden_size": 640,
               "sliding_window": 512, "layer_types": ["full_attention" if (l + 1) % 6 == 0 else "sliding_attention" for l in range(18)]}


def test_windowed_kv_savings_by_hand():
    """Gemma-3-270M at 4096 tokens: 15 sliding layers cache 512 tokens, 3 global layers 4096 (19.5 MiB of K+V)."""
    plan = SharePlan(18, [1, 2, 3], model=GEMMA3_270M)
    s = plan.savings(context_len=4096)
    per_token = 1 * 256 * 2  # one KV head of 256, bf16
    assert s["kv_cache_bytes_at_context"] == 2 * per_token * (15 * 512 + 3 * 4096) == 20_447_232  # 19.5 MiB
    assert s["kv_cache_bytes_saved_at_context"] == 3 * per_token * 512  # three sliding K caches, values unchanged
    assert s["kv_cache_fraction_saved"] == pytest.approx(3 * 512 / (2 * (15 * 512 + 3 * 4096)))
    # a global follower of a sliding anchor: its K cache goes and its values shrink to the window
    mixed = SharePlan(18, [5], model=GEMMA3_270M).savings(context_len=4096)
    assert mixed["kv_cache_bytes_saved_at_context"] == per_token * (4096 + 4096 - 512)


def gemma_report(seq_len: int) -> AttentionReport:
    kl = np.full((18, 18), 1.0)
    for l in range(18):
        kl[l, l] = 0.0
    kl[5, 4] = kl[11, 10] = 0.01  # a global layer looks just like the sliding layer before it (short analysis)
    report = fake_report(kl, n_heads=4, model=GEMMA3_270M)
    report.meta["data"] = {"seq_len": seq_len}
    return report


def test_pairs_whose_masks_differ_are_forbidden_and_said():
    plan = plan_spans(gemma_report(256), budget=2, stability_resamples=0)
    assert not set(plan.followers) & {5, 11, 17} and plan.mask_notes == {}
    assert any("not allowed" in note for note in plan.notes)
    assert any("256 tokens" in note and "--seq-len 1024" in note for note in plan.notes)
    allowed = plan_spans(gemma_report(256), budget=2, mask_change=True, stability_resamples=0)
    assert allowed.followers == [5, 11]
    assert "past 512 tokens layer 5 sees only the last 512" in allowed.mask_notes[5]
    assert not any("no longer than the sliding window" in n for n in plan_spans(gemma_report(1024), budget=2, stability_resamples=0).notes)


# ----- stability -----------------------------------------------------------------------------------------------------
def test_bootstrap_stability_of_a_clear_and_a_coin_toss_choice():
    kl = np.full((6, 6), 1.0)
    kl[3, 2] = 0.1  # a clear choice: the planner picks 3 whatever the resample
    clear = fake_report(kl, n_seqs=8)
    plan = plan_spans(clear, budget=1, stability_resamples=50)
    assert plan.followers == [3] and plan.stability["followers"] == {3: 1.0} and plan.stability["same_plan"] == 1.0
    toss = fake_report(kl, n_seqs=8)
    per_seq = toss.arrays["kl_layers"]
    per_seq[:, 3, 2] = np.where(np.arange(8) % 2 == 0, 0.0, 0.2)  # layers 3 and 4 alternate as the cheaper one
    per_seq[:, 4, 3] = np.where(np.arange(8) % 2 == 0, 0.2, 0.0001)
    plan = plan_spans(toss, budget=1, stability_resamples=200)
    share = plan.stability["followers"][plan.followers[0]]
    assert 0.3 < share < 0.9 and plan.stability["resamples"] == 200
    assert SharePlan.from_dict(plan.to_dict()).stability == plan.stability


def test_analysis_length_exposes_the_window_or_says_why_not():
    from sa_analysis.shapes import analysis_length

    gemma = GEMMA3_270M["layer_types"]
    assert analysis_length(None, gemma, 512, 32768, on_gpu=False, default=256)[0] == 1024
    assert analysis_length(None, ["sliding_attention"] * 4, 4096, 32768, on_gpu=False, default=256) == (256, None)  # Mistral: one mask
    assert analysis_length(None, ["full_attention"] * 4, None, 4096, on_gpu=False, default=256) == (256, None)
    kept, why = analysis_length(None, gemma, 4096, 8192, on_gpu=False, default=256)
    assert kept == 256 and "--seq-len 8192" in why and "CPU" in why
    assert analysis_length(None, gemma, 4096, 8192, on_gpu=True, default=256)[0] == 8192
    given, note = analysis_length(300, gemma, 512, 32768, on_gpu=True, default=256)
    assert given == 300 and "does not reach the 512-token sliding window" in note
    assert analysis_length(600, gemma, 512, 32768, on_gpu=False, default=256) == (600, None)
