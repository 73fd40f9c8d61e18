"""Measured output damage: the replayed forward equals the whole one, damage equals a direct computation, the
planner prices plans by it, and the recommended plan rests on measurements."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from sa_analysis import parts
from sa_analysis.data import TokenBatch
from sa_analysis.errors import UserError
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.patch import share_attention
from sa_analysis.planner import PlanConstraints, SharePlan, anchors_for, plan_spans, price_pairs
from sa_analysis.damage.measure import plan_from_damage
from sa_analysis.damage.prefix import PrefixRun
from sa_analysis.damage.table import DamageTable, damage_prices, plan_spans_ways, predict
from sa_analysis.parts import replay_from
from sa_analysis.planner.optimal import SpanPrices, optimal_followers
from sa_analysis.report import AttentionReport
from sa_analysis.stats import mean_and_interval

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ("llama", "qwen3", "gemma2", "gemma3_text")


def _ids(n_seqs=3, seq_len=12, seed=0, vocab=128):
    return torch.randint(3, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))


def _reference(model, ids, anchor_of, head_map=None, probe=False):
    """[S, T-1, V] float64 log-probabilities of a whole patched forward (the baseline when `anchor_of` is empty)."""
    with torch.no_grad(), share_attention(model, anchor_of, head_map=head_map, probe=probe):
        return torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].double(), -1)


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_from_any_layer_equals_the_whole_forward(arch, device):
    model = tiny_model(arch, n_layers=5, device=device)
    ids = _ids().to(device)
    run = PrefixRun.record(model, ids)
    with torch.no_grad():
        whole = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        for start in range(5):
            with replay_from(model, start, run.layer_inputs[start]):
                replayed = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            assert torch.equal(replayed, whole), start
    layers = parts.decoder_layers(model)
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)  # every layer put back
    logits = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(parts.next_token_logits(model, whole), logits, atol=1e-12)  # Gemma 2's final softcap too


@pytest.mark.parametrize("arch", ARCHS)
def test_damage_equals_a_direct_computation(arch, device):
    model = tiny_model(arch, n_layers=5, device=device)
    ids = _ids().to(device)
    run = PrefixRun.record(model, ids)
    plan, heads = {3: 2, 4: 2}, {4: [1, 0, 3, 2]}  # Gemma: a global follower (3) reads a windowed anchor too
    damage = run.damage(plan, heads)
    base, patched = _reference(model, ids, {}), _reference(model, ids, plan, heads)
    kl = (base.exp() * (base - patched)).sum(-1).mean(-1).cpu()  # [S]
    targets = ids[:, 1:, None]
    nll = (base.gather(-1, targets) - patched.gather(-1, targets)).squeeze(-1).mean(-1).cpu()
    agree = (base.argmax(-1) == patched.argmax(-1)).double().mean(-1).cpu()
    assert np.allclose(damage.kl, kl.numpy(), atol=1e-12) and np.allclose(damage.nll_change, nll.numpy(), atol=1e-12)
    assert np.allclose(damage.top1, agree.numpy())
    assert damage.kl_mean > 0
    assert run.baseline_nll == pytest.approx(float(-base.gather(-1, targets).mean()), abs=1e-12)
    assert run.damage({}).kl == [0.0, 0.0, 0.0]


def test_a_probe_reads_an_earlier_anchor_and_only_a_probe_may():
    model = tiny_model("llama", n_layers=5)
    ids = _ids()
    with pytest.raises(UserError, match="last non-shared layer"):
        share_attention(model, {4: 1})
    run = PrefixRun.record(model, ids)
    damage = run.damage({4: 1}, probe=True)
    base, patched = _reference(model, ids, {}), _reference(model, ids, {4: 1}, probe=True)
    assert np.allclose(damage.kl, (base.exp() * (base - patched)).sum(-1).mean(-1).numpy(), atol=1e-12)
    assert damage.kl != run.damage({4: 3}).kl


def test_a_large_vocabulary_recomputes_the_baseline_from_the_head_with_the_same_numbers(monkeypatch):
    from sa_analysis.damage import logprobs as compare

    model = tiny_model("llama", dtype=torch.float32, vocab_size=4096)
    ids = _ids(seq_len=40, vocab=4096)
    kept = PrefixRun.record(model, ids)
    recomputed = PrefixRun.record(model, ids, keep_bytes=0)
    assert kept.base_log_probs is not None and recomputed.base_log_probs is None
    monkeypatch.setattr(compare, "POSITION_CHUNK", 7)
    a, b = kept.damage({2: 1, 3: 1}), recomputed.damage({2: 1, 3: 1})
    assert np.allclose(a.kl, b.kl, rtol=1e-4) and np.allclose(a.nll_change, b.nll_change, rtol=1e-4, atol=1e-6)
    assert kept.baseline_nll == pytest.approx(recomputed.baseline_nll, rel=1e-6)


# ----- the planner on measured damage (numpy only) --------------------------------------------------------------
def _report(n_layers=5, kl=None):
    kl = np.full((n_layers, n_layers), 0.5) if kl is None else kl
    model = {"name": "tiny-llama", "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_size": 64}
    return AttentionReport(meta={"model": model}, arrays={"kl_layers": kl[None]})


def _table(values: dict, n_layers=5, n_seqs=3) -> DamageTable:
    table = DamageTable(n_layers, n_seqs, 30, 2.0)
    for (m, a, way), kl in values.items():
        per = [kl * f for f in (0.8, 1.0, 1.2)]
        table.pairs[(m, a, way)] = {"kl": per, "nll_change": per, "top1": [1.0] * n_seqs}
    return table


def test_mean_and_interval_is_the_student_t_interval():
    mean, low, high = mean_and_interval([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    half = 3.182446305284263 * math.sqrt(14 / 3) / 2  # t(0.975, 3) * sd / sqrt(n)
    assert (low, high) == pytest.approx((3.0 - half, 3.0 + half))
    assert mean_and_interval([2.5]) == (2.5, 2.5, 2.5)


def test_the_planner_minimises_measured_damage_not_attention_similarity():
    kl = np.full((5, 5), 0.5)
    kl[1, 0] = 0.01  # by attention similarity layer 1 is free
    table = _table({(1, 0, "index"): 0.9, (2, 1, "index"): 0.2, (3, 2, "index"): 0.05, (4, 3, "index"): 0.1})
    by_similarity = plan_spans(_report(kl=kl), budget=1, align_heads="off", stability_resamples=0)
    by_damage = plan_spans(_report(kl=kl), budget=1, align_heads="off", damage=table)
    assert by_similarity.followers == [1] and by_damage.followers == [3]
    assert by_damage.cost_name == "output-kl" and by_damage.follower_costs == {3: pytest.approx(0.05)}
    assert by_damage.stability is None and by_damage.constraints["damage"] == "measured"
    prices = damage_prices(table, price_pairs(_report(kl=kl), "kl", "off"), "off")
    assert prices.estimated[4, 2] and not prices.estimated[4, 3]  # a deeper anchor is estimated until measured
    assert prices.costs[4, 2] == pytest.approx(0.1)  # the adjacent damage times the similarity ratio (1 here)
    two = plan_spans(_report(kl=kl), budget=2, align_heads="off", damage=table)
    assert two.followers == [3, 4] and two.anchor_of == {3: 2, 4: 2}  # priced with the estimate for (4, 2)


def test_a_head_map_is_taken_where_it_measured_less():
    table = _table({(2, 1, "index"): 0.3, (2, 1, "aligned"): 0.1, (3, 2, "index"): 0.1, (3, 2, "aligned"): 0.4,
                    (1, 0, "index"): 1.0, (4, 3, "index"): 1.0})
    table.maps[(2, 1)] = [1, 0, 3, 2]
    assert table.way_for(2, 1, "auto") == "aligned" and table.way_for(3, 2, "auto") == "index"
    assert table.way_for(3, 2, "on") == "aligned" and table.way_for(2, 1, "off") == "index"
    prediction = predict(table, [2], {2: [1, 0, 3, 2]})
    assert prediction.kl == pytest.approx(0.1) and prediction.followers[2].way == "aligned"
    assert prediction.kl_low < 0.1 < prediction.kl_high
    again = DamageTable.from_dict(table.to_dict())
    assert again.pairs == table.pairs and again.maps == table.maps


def _span(table: DamageTable, anchor: int, ways: tuple, kl: float) -> None:
    per = [kl * f for f in (0.8, 1.0, 1.2)]
    table.spans[(anchor, ways)] = {"kl": per, "nll_change": per, "top1": [1.0] * table.n_seqs}


def test_a_span_measured_whole_replaces_the_sum_of_its_followers():
    pairs = {(1, 0, "index"): 0.5, (2, 1, "index"): 0.1, (3, 2, "index"): 0.1, (4, 3, "index"): 0.3,
             (3, 1, "index"): 0.1, (4, 2, "index"): 0.3}
    table = _table(pairs)
    additive = plan_spans(_report(), budget=2, align_heads="off", damage=table)
    assert additive.followers == [2, 3]  # 0.1 + 0.1 alone
    _span(table, 1, ("index", "index"), 0.7)  # measured whole, 2 and 3 compound
    whole = plan_spans(_report(), budget=2, align_heads="off", damage=table)
    assert whole.followers == [2, 4]  # 0.1 + 0.3 as two spans beats 0.7
    prediction = predict(table, [2, 3], {})
    assert prediction.kl == pytest.approx(0.7) and prediction.spans["2-3"].anchor == 1
    assert prediction.additive == [] and predict(table, [3, 4], {}).additive == ["3-4"]
    assert predict(table, [3, 4], {}).kl == pytest.approx(0.1 + 0.3)  # (3, 2) and (4, 2) alone
    assert table.interaction() == pytest.approx(0.7 / 0.2)
    prices = damage_prices(table, price_pairs(_report(), "kl", "off"), "off")
    assert prices.spans.whole == {(1, 2): pytest.approx(0.7)} and prices.spans.interaction == pytest.approx(3.5)
    again = DamageTable.from_dict(table.to_dict())
    assert again.spans == table.spans


def test_an_unmeasured_span_costs_its_sum_times_the_interaction_seen():
    pairs = {(m, m - 1, "index"): 0.1 for m in range(1, 6)}
    table = _table({**pairs, (3, 1, "index"): 0.1}, n_layers=6)
    _span(table, 1, ("index", "index"), 0.4)  # ratio 2 on the one span measured
    prices = damage_prices(table, price_pairs(_report(6), "kl", "off"), "off")
    assert prices.spans.price(3, 2, 0.2) == pytest.approx(0.4) and prices.spans.price(1, 2, 0.2) == pytest.approx(0.4)
    assert SpanPrices().price(3, 2, 0.2) == 0.2  # nothing measured whole: additive


def test_the_dynamic_programme_with_whole_spans_equals_brute_force():
    import itertools

    rng = np.random.default_rng(7)
    n = 7
    costs = np.tril(rng.uniform(0.05, 1.0, (n, n)), -1)
    whole = {(a, k): float(rng.uniform(0.5, 3.0) * sum(costs[a + i, a] for i in range(1, k + 1)))
             for a in range(n) for k in range(2, n - a)}
    spans = SpanPrices(whole=whole)

    def price(followers):
        groups = {}
        for m, a in anchors_for(followers, n).items():
            groups.setdefault(a, []).append(m)
        return sum(costs[m[0], a] if len(m) == 1 else whole[(a, len(m))] for a, m in groups.items())

    for budget in (1, 2, 3, 4):
        best = min(itertools.combinations(range(1, n), budget), key=price)
        chosen = optimal_followers(costs, budget=budget, spans=spans)
        assert price(chosen) == pytest.approx(price(best)), budget


# ----- the recommended plan ----------------------------------------------------------------------------------------
def _loaded(n_layers=5):
    model = tiny_model("llama", n_layers=n_layers)
    return LoadedModel(model=model, tokenizer=None, info=describe(model, "tiny-llama", "tiny", "random-init"))


def test_plan_from_damage_rests_on_measurements_and_checks_interactions(tmp_path):
    loaded = _loaded()
    kl = np.full((5, 5), 0.5)
    report = _report(kl=kl)
    batch = TokenBatch(_ids(seed=4), "test", "calibration", 1)
    said = []
    found = plan_from_damage(loaded, report, batch, budget=2, constraints=PlanConstraints(align_heads="off"),
                             progress=said.append)
    plan, table = found.plan, found.table
    assert plan.n_shared == 2 and all(table.has(m, a) for m, a in plan.anchor_of.items())
    assert {(m, a) for m, a, _ in table.pairs} >= {(m, m - 1) for m in range(1, 5)}
    measured = [row["measured"].kl for row in found.checked]
    chosen = next(row for row in found.checked if row["followers"] == plan.followers)
    assert chosen["measured"].kl == min(measured)
    run = PrefixRun.record(loaded.model, batch)
    assert chosen["measured"].kl == pytest.approx(run.damage(plan.anchor_of).kl_mean, rel=1e-12)  # measured whole
    assert plan.damage.plan == chosen["measured"]
    for a, ways in plan_spans_ways(plan.followers, plan.head_map, 5):  # every span of two or more measured whole
        assert len(ways) == 1 or (a, ways) in table.spans
    run_spans = {a: len(ways) for a, ways in plan_spans_ways(plan.followers, plan.head_map, 5)}
    if len(run_spans) == 1:  # one span: the span model's prediction is the whole plan's measurement
        assert plan.damage.predicted.kl == pytest.approx(chosen["measured"].kl, rel=1e-12)
    else:
        assert plan.damage.predicted.kl == pytest.approx(sum(plan.damage.followers[m].kl for m in plan.followers))
    assert any("about" in line and "left" in line for line in said)  # progress with a time estimate
    again = SharePlan.load(plan.save(tmp_path / "plan.json"))
    assert again.damage.followers == plan.damage.followers and again.damage.plan == plan.damage.plan
    assert again.damage.predicted == plan.damage.predicted


def test_the_baselines_are_measured_whole_on_the_same_tokens(tmp_path):
    from sa_analysis.planner import compare_plans, evaluate_plan
    from sa_analysis.damage.measure import measure_similarity_plans

    loaded = _loaded(6)
    report = _report(n_layers=6, kl=np.random.default_rng(0).uniform(0.1, 1.0, (6, 6)))
    batch = TokenBatch(_ids(seed=5), "test", "calibration", 1)
    found = plan_from_damage(loaded, report, batch, budget=2, constraints=PlanConstraints(align_heads="off"))
    plans = compare_plans(report, evaluate_plan(found.plan, report, "kl"), cost="kl")
    count = found.meter.count
    measured = measure_similarity_plans(found, plans)
    assert measured["optimal"].followers == found.plan.followers and measured["optimal"].aligned == []
    assert measured["optimal"].measured == found.plan.damage.plan
    run = PrefixRun.record(loaded.model, batch)  # an independent record of the same tokens
    for name, plan in plans.items():
        if isinstance(plan, str):
            assert name not in measured
            continue
        assert measured[name].measured.kl == pytest.approx(run.damage(plan.anchor_of, plan.head_map).kl_mean, rel=1e-9), name
    new = {tuple(p.followers) for n, p in plans.items() if not isinstance(p, str)} - {tuple(r["followers"]) for r in found.checked}
    assert found.meter.count - count == len(new)  # a plan measured before is not measured again
    assert set(found.plan.damage.baselines) == set(measured) - {"optimal"}
    again = SharePlan.load(found.plan.save(tmp_path / "plan.json"))
    assert again.damage.baselines == found.plan.damage.baselines


def json_round_trip(value):
    import json

    return json.loads(json.dumps(value))


def test_the_search_reuses_measurements_and_proves_the_choice_on_held_out_text(tmp_path):
    from sa_analysis.plots import plot_search
    from sa_analysis.search import PlanSearch, search_plans

    loaded = _loaded(4)
    calibration = TokenBatch(_ids(seed=2), "test", "calibration", 1)
    heldout = TokenBatch(_ids(seed=3), "test", "heldout", 1)
    report = _report(n_layers=4)
    search = search_plans(loaded, report, calibration, heldout, tolerance=1e9)
    singles = [r for r in search.rows if r.stage == "sensitivity"]
    assert sorted(r.followers[0] for r in singles if not r.aligned) == [1, 2, 3]
    assert len(search.best["followers"]) == 3 and search.validation.data["split"] == "heldout"
    chosen = next(r for r in search.rows if r.followers == search.best["followers"] and r.stage == "candidate")
    assert chosen.kl_low <= chosen.kl_mean <= chosen.kl_high
    assert "measured damage" in chosen.methods
    again = PlanSearch.load(search.save(tmp_path / "search.json"))
    assert again.rows == search.rows and again.best_plan.followers == [1, 2, 3]
    assert plot_search(again, tmp_path / "search.png").read_bytes()[:4] == b"\x89PNG"
    strict = search_plans(loaded, report, calibration, heldout, tolerance=0.0)
    assert strict.best is None or all(r.passed for r in strict.rows if r.followers == strict.best["followers"])


def test_long_sequences_are_compared_at_strided_positions():
    model = tiny_model("llama", n_layers=4)
    ids = _ids(n_seqs=2, seq_len=40)
    run = PrefixRun.record(model, ids, compared=10)
    assert run.positions.tolist() == list(range(0, 39, 4)) and run.n_tokens == 20
    damage = run.damage({2: 1, 3: 1})
    base, patched = _reference(model, ids, {}), _reference(model, ids, {2: 1, 3: 1})
    kl = (base.exp() * (base - patched)).sum(-1)[:, ::4].mean(-1)  # the same positions, whole context each
    assert np.allclose(damage.kl, kl.numpy(), atol=1e-12)
