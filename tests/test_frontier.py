"""The sharing frontier: one damage table serves every budget, held-out perplexity equals an independent whole-model
computation, a stopped run resumes without measuring again, the baselines are what they say, the tolerance is read
right, the figure is drawn; and the command end to end on a tiny model (heals judged against the control)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sa_analysis.data import TokenBatch
from sa_analysis.errors import UserError
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.planner import PlanConstraints, SharePlan
from sa_analysis.report import AttentionReport
from sa_analysis.search.baselines import best_contiguous_plan, greedy_plans, last_layers_plan
from sa_analysis.damage.measure import plan_from_damage
from sa_analysis.damage.prefix import PrefixRun
from sa_analysis.search import Frontier, FrontierState, measure_frontier

pytestmark = pytest.mark.usefixtures("one_thread")
OFF = PlanConstraints(align_heads="off")


def _ids(seed, n_seqs=3, seq_len=12, vocab=128):
    return torch.randint(3, vocab, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))


def _loaded(n_layers=6, device="cpu"):
    model = tiny_model("llama", n_layers=n_layers, device=device)
    return LoadedModel(model=model, tokenizer=None, info=describe(model, "tiny-llama", "tiny", "random-init"))


def _report(n_layers=6):
    kl = np.random.default_rng(0).uniform(0.1, 1.0, (n_layers, n_layers))
    model = {"name": "tiny-llama", "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_size": 64}
    return AttentionReport(meta={"model": model}, arrays={"kl_layers": kl[None]})


def _batches(device="cpu"):
    return (TokenBatch(_ids(1).to(device), "test", "calibration", 1), TokenBatch(_ids(2).to(device), "test", "heldout", 1))


def _held_out_perplexity(model, ids, plan: SharePlan) -> float:
    """Independent: a whole patched forward, float64 log-softmax, every next token."""
    from sa_analysis.patch import share_attention

    with torch.no_grad(), share_attention(model, plan.anchor_of, head_map=plan.head_map):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].double()
    nll = -torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).mean()
    return math.exp(float(nll))


def test_one_table_serves_every_budget_and_held_out_perplexity_is_the_whole_models(device):
    loaded, report = _loaded(device=device), _report()
    calibration, heldout = _batches(device)
    state, _held = measure_frontier(loaded, report, calibration, heldout, [3, 1, 2], constraints=OFF)
    assert sorted(state.points) == [1, 2, 3]
    counts = [state.points[k].measurements for k in (1, 2, 3)]
    assert counts == sorted(counts)  # one running count: later budgets add only what they need
    alone = plan_from_damage(loaded, report, calibration, budget=3, constraints=OFF)  # the largest budget by itself
    assert state.points[3].plan["followers"] == alone.plan.followers
    assert counts[-1] <= alone.meter.count + 2 * 3  # the frontier costs little more than its largest budget alone
    for k, point in state.points.items():
        plan = SharePlan.from_dict(point.plan)
        assert plan.n_shared == k
        expected = _held_out_perplexity(loaded.model, heldout.input_ids, plan)
        assert point.heldout.perplexity == pytest.approx(expected, rel=1e-9), k
        assert point.heldout.perplexity_low <= point.heldout.perplexity <= point.heldout.perplexity_high
        assert point.savings["n_shared"] == k and point.savings["kv_cache_fraction_saved"] == pytest.approx(k / 12)


def test_a_stopped_frontier_resumes_without_measuring_again(tmp_path):
    loaded, report = _loaded(), _report()
    calibration, heldout = _batches()
    saved = tmp_path / "state.json"

    class Stop(Exception):
        pass

    def save_then_stop(state):
        saved.write_text(json.dumps(state.to_dict()))
        if len(state.points) == 1:
            raise Stop

    with pytest.raises(Stop):
        measure_frontier(loaded, report, calibration, heldout, [1, 2], constraints=OFF, on_measured=save_then_stop)
    resumed = FrontierState.from_dict(json.loads(saved.read_text()))
    assert list(resumed.points) == [1] and resumed.table.pairs
    pairs_before = len(resumed.table.pairs)
    said: list[str] = []
    state, _ = measure_frontier(loaded, report, calibration, heldout, [1, 2], constraints=OFF, state=resumed,
                                progress=said.append)
    assert len(state.table.pairs) >= pairs_before and not any("layer 1 reads 0" in line for line in said)
    fresh, _ = measure_frontier(loaded, report, calibration, heldout, [1, 2], constraints=OFF)
    # the resumed run measured exactly what the uninterrupted one measured after budget 1
    assert state.points[2].measurements == fresh.points[2].measurements - fresh.points[1].measurements
    assert state.points[2].plan["followers"] == fresh.points[2].plan["followers"]
    assert state.points[2].heldout.to_dict() == pytest.approx(fresh.points[2].heldout.to_dict())


def test_the_baselines_are_what_they_say():
    loaded = _loaded()
    run = PrefixRun.record(loaded.model, _ids(1))
    assert last_layers_plan(6, 2).followers == [4, 5] and last_layers_plan(6, 2).anchor_of == {4: 3, 5: 3}
    plan, damage = best_contiguous_plan(run, 2)
    every = {first: run.damage(SharePlan(n_layers=6, followers=[first, first + 1]).anchor_of).kl_mean for first in range(1, 5)}
    assert plan.followers[0] == min(every, key=every.get) and damage.kl == pytest.approx(min(every.values()))
    greedy = greedy_plans(run, 3)
    assert [len(p.followers) for p, _ in greedy.values()] == [1, 2, 3]
    assert set(greedy[1][0].followers) < set(greedy[2][0].followers) < set(greedy[3][0].followers)  # nested
    singles = {m: run.damage({m: m - 1}).kl_mean for m in range(1, 6)}
    assert greedy[1][0].followers == [min(singles, key=singles.get)]  # step 1: the least damaging layer alone
    first = greedy[1][0].followers[0]
    pairs = {m: run.damage(SharePlan(n_layers=6, followers=sorted({first, m})).anchor_of).kl_mean
             for m in range(1, 6) if m != first}
    assert set(greedy[2][0].followers) == {first, min(pairs, key=pairs.get)}


def test_the_frontier_measures_the_baselines_beside_each_budget():
    """`baselines=`: each method's plan at each budget, on the same held-out tokens (perplexity equal to an
    independent whole-model computation) with its paired difference from the recommended plan."""
    from sa_analysis.choices import BASELINES
    from sa_analysis.stats import paired_interval

    loaded, report = _loaded(), _report()
    calibration, heldout = _batches()
    state, untouched = measure_frontier(loaded, report, calibration, heldout, [1, 2], constraints=OFF,
                                        baselines=BASELINES)
    run = PrefixRun.record(loaded.model, calibration)
    greedy = greedy_plans(run, 2)
    ids = heldout.input_ids
    base_nll = [math.log(_held_out_perplexity(loaded.model, ids[i:i + 1], SharePlan(6, []))) for i in range(3)]
    for k, point in state.points.items():
        assert list(point.baselines) == list(BASELINES)
        expected = {"last k layers": last_layers_plan(6, k).followers,
                    "best contiguous span": best_contiguous_plan(run, k)[0].followers, "greedy (SLEB)": greedy[k][0].followers}
        ours = SharePlan.from_dict(point.plan)
        ours_nll = [math.log(_held_out_perplexity(loaded.model, ids[i:i + 1], ours)) for i in range(3)]
        for method, row in point.baselines.items():
            assert row.followers == expected[method], (k, method)
            plan = SharePlan(6, row.followers)
            assert row.heldout.perplexity == pytest.approx(_held_out_perplexity(loaded.model, ids, plan), rel=1e-9)
            theirs = [math.log(_held_out_perplexity(loaded.model, ids[i:i + 1], plan)) for i in range(3)]
            mean, low, high = paired_interval(theirs, ours_nll)
            assert row.vs_recommended == pytest.approx([math.expm1(v) for v in (mean, low, high)], rel=1e-6, abs=1e-9)
            assert row.calibration.kl == pytest.approx(run.damage(plan.anchor_of).kl_mean)
    assert untouched.untouched_nll == pytest.approx(base_nll, rel=1e-9)


def test_unknown_baselines_are_refused_with_a_suggestion():
    from sa_analysis.choices import parse_baselines

    assert parse_baselines("greedy, last-k") == ("greedy (SLEB)", "last k layers") and parse_baselines(None) == ()
    assert parse_baselines("all,greedy") == ("last k layers", "best contiguous span", "greedy (SLEB)")
    with pytest.raises(UserError, match="did you mean contiguous"):
        parse_baselines("contigous")


def _point(budget, ppl, healed=None):
    from sa_analysis.planner.record import Summary
    from sa_analysis.search import FrontierPoint

    nll = math.log(ppl / 10)
    return FrontierPoint(budget=budget, plan={"followers": list(range(1, budget + 1))},
                         predicted=Summary(kl=0.1, kl_low=0.0, kl_high=0.2, nll_change=0.01, nll_change_low=0.0,
                                           nll_change_high=0.02, top1=0.9),
                         heldout=Summary(kl=0.1, kl_low=0.0, kl_high=0.2, nll_change=nll, nll_change_low=nll - 0.02,
                                         nll_change_high=nll + 0.02, top1=0.9, perplexity=ppl,
                                         perplexity_low=ppl * 0.98, perplexity_high=ppl * 1.02),
                         savings={"kv_cache_fraction_saved": budget / 20, "context_len": 4096},
                         measurements=budget, seconds=1.0, healed=healed)


def test_the_largest_budget_within_the_tolerance_before_and_after_healing(tmp_path):
    from sa_analysis.plots import plot_frontier

    from dataclasses import replace

    from sa_analysis.search.frontier import HealedText

    def healed(change, untouched, kl_before, kl_after):
        one = HealedText(baseline=10.0, patched=11.0, healed=10 * (1 + untouched), control=10 * (1 + untouched) / (1 + change),
                         change=change, change_untouched=untouched, before=0.1, after_untouched=math.log1p(untouched),
                         kl_before=kl_before, kl_after=kl_after)
        return {"heal data, held out": one, "other text": replace(one, change=change / 2)}

    points = [_point(1, 10.2, healed(0.01, 0.0, 0.02, 0.01)), _point(2, 10.4, healed(0.03, 0.04, 0.05, 0.03)),
              _point(3, 10.8, healed(0.06, 0.02, 0.09, 0.06)),  # within of the untouched model, but further in KL
              _point(4, 10.3, healed(0.2, 0.06, 0.1, 0.04))]  # a later budget back within: still the largest that is
    frontier = Frontier(model={"name": "m", "n_layers": 10}, points=points, baseline={"perplexity": 10.0, "nll": math.log(10)},
                        tolerance=0.05, calibration={}, heldout={}, heal={"config": {"steps": 3}})
    bound = {"heal data, held out": 0.1, "other text": 0.1}  # the 4-layer plan (within before healing), before healing
    assert frontier.within() == {"before": 4, "after": {"heal data, held out": 2, "other text": 3},
                                 "after_untouched": {"heal data, held out": 3, "other text": 3},
                                 "kl_bound": bound, "faithful": 3}
    points[3].healed = None  # the bound then comes from the frontier's own held-out KL of that plan
    points[3].heldout.kl = 0.04
    assert frontier.within()["kl_bound"] == {"heal data, held out": 0.04, "other text": 0.04}
    assert frontier.within()["faithful"] == 2
    points[3].healed = healed(0.2, 0.06, 0.1, 0.04)
    again = Frontier.load(frontier.save(tmp_path / "frontier.json"))
    assert again.within() == frontier.within() and again.points[2].heldout == points[2].heldout
    baselines = {"last k": {"saved": [5, 10, 15, 20], "before": [3, 8, 12, 30], "after": {"heal data, held out": [1, 4, 7, 9]}}}
    [png] = plot_frontier(again, tmp_path / "frontier", baselines=baselines)
    assert png.read_bytes()[:4] == b"\x89PNG"
    frontier.tolerance = 0.0
    assert frontier.within()["before"] is None


def test_budgets_are_parsed_before_anything_loads():
    from sa_analysis.prechecks import check_budgets, parse_budgets

    assert parse_budgets("1-3,8") == [1, 2, 3, 8] and parse_budgets(None) is None
    assert parse_budgets("3, 8,15") == [3, 8, 15] and parse_budgets("8,3,3") == [3, 8]
    assert check_budgets(None, n_layers=30) == list(range(1, 16)) and check_budgets([8, 3], n_layers=30) == [3, 8]
    for bad in ("0-3", "3-1", "x", "1-", ""):
        with pytest.raises(UserError, match="--budgets"):
            parse_budgets(bad)
    with pytest.raises(UserError, match="the most is 29"):
        check_budgets(parse_budgets("1-30"), n_layers=30)


def healed_frontier_command(tmp_path, monkeypatch, steps: int, *extra) -> tuple[list, Path]:
    """(arguments, output folder) of `frontier` on a tiny saved Llama, budgets 1-2 healed for `steps` steps, with a
    control cache of its own."""
    monkeypatch.setattr("sa_analysis.heal.control.cache_root", lambda: tmp_path / "cache")
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    out = tmp_path / "out"
    return ["frontier", "--model", folder, "--budgets", "1-2", "--n-seqs", 2, "--seq-len", 32, "--heal-steps", steps,
            "--batch-size", 2, *extra, "--out", out], out


def test_the_command_heals_each_plan_against_one_control_and_resumes(tmp_path, monkeypatch):
    from cli.main import app

    args, out = healed_frontier_command(tmp_path, monkeypatch, 2)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Sharing frontier" in result.output and "vs control" in result.output
    assert "other text KL" in result.output and "Faithful reach:" in result.output
    assert "about" in result.output and "left" in result.output  # progress with a time estimate, as plain lines
    assert "control: step 2/2" in result.output and "heal 2 of 2: step 2/2" in result.output  # and through the heals
    frontier = Frontier.load(out / "frontier.json")
    assert [p.budget for p in frontier.points] == [1, 2] and all(p.healed for p in frontier.points)
    assert frontier.heal["control"]["status"] == "run"
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for point in frontier.points:
        for values in point.healed.values():
            assert values.change == pytest.approx(values.healed / values.control - 1)
    controls = {p.healed["other text"].control for p in frontier.points}
    assert len(controls) == 1  # one control serves every plan
    again = CliRunner().invoke(app, [str(a) for a in args + ["--resume"]])
    assert again.exit_code == 0 and "resumed:" in again.output and "damage 1:" not in again.output, again.output
    assert Frontier.load(out / "frontier.json").points[1].healed == frontier.points[1].healed
    other = CliRunner().invoke(app, [str(a) for a in args[:-2] + ["--first-shareable", 2, "--out", out, "--resume"]])
    assert other.exit_code == 1 and "another model, text, constraints" in other.output


def test_frontier_mistakes_are_answered_before_torch():
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from cli.main import app; "
            "r = CliRunner().invoke(app, ['frontier', '--budgets', '3-1']); "
            "print(r.exit_code, 'torch' in sys.modules); print(r.output)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first = done.stdout.splitlines()[0]
    assert first == "1 False", done.stdout + done.stderr
    assert "--budgets" in done.stdout and "Traceback" not in done.stdout


def test_the_command_prints_the_baselines_and_draws_them(tmp_path):
    from cli.main import app

    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    args = ["frontier", "--model", folder, "--budgets", "1-2", "--n-seqs", 2, "--seq-len", 32,
            "--baselines", "last-k,contiguous", "--out", tmp_path / "out"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "beside the recommendation" in result.output and "vs recommended" in result.output
    frontier = Frontier.load(tmp_path / "out" / "frontier.json")
    assert all(list(p.baselines) == ["last k layers", "best contiguous span"] for p in frontier.points)
    from sa_analysis.plots.frontier import baseline_series

    series = baseline_series(frontier)
    assert list(series) == ["last k layers", "best contiguous span"] and len(series["last k layers"]["before"]) == 2
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    wrong = CliRunner().invoke(app, [str(a) for a in args[:-2] + ["--baselines", "gready", "--out", tmp_path / "o2"]])
    assert wrong.exit_code == 1 and "did you mean greedy" in wrong.output and not (tmp_path / "o2").exists()


def test_published_frontier_files_read_into_records_and_write_back_the_same():
    """Frontier files written before the records (2026-12-07, two heal objectives, 15 budgets healed) read into
    Summary / HealedText / PlanDamage fields and write back key for key, value for value (a field added since, the
    baselines, as None)."""
    from sa_analysis.io import json_safe
    from sa_analysis.planner.record import Summary
    from sa_analysis.search.frontier import HealedText

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "2026-12-07-h100-heal-objectives"
    for name in ("smollm2-lm1000", "smollm2-distill100"):
        written = json.loads((results / name / "frontier.json").read_text())
        frontier = Frontier.from_dict(written)
        point = frontier.points[0]
        assert isinstance(point.heldout, Summary) and point.heldout.perplexity > 0
        assert all(isinstance(h, HealedText) for h in point.healed.values())
        assert SharePlan.from_dict(point.plan).damage.plan.kl == point.predicted.kl
        again = json.loads(json.dumps(json_safe(frontier.to_dict())))
        for old, new in zip(written["points"], again["points"]):  # a field added since reads as None
            assert new == {**old, **{k: None for k in set(new) - set(old)}}, name
        assert again["within"] == written["within"], name
