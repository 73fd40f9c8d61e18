"""Validation: metrics against a direct computation, pass/fail, measured speed and KV bytes, the report file, the
plan search loop and its figure, lm-eval tasks, and the `sa-analyze validate` command."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_model
from sa_analysis.data import TokenBatch
from sa_analysis.errors import UserError
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.patch import share_attention
from sa_analysis.planner import SharePlan
from sa_analysis.report import AttentionReport
from sa_analysis.search import search_plans
from sa_analysis.validate import ValidationReport, run_tasks, validate_plan

PLAN = {2: 1, 3: 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _loaded(arch="llama"):
    model = tiny_model(arch)
    return LoadedModel(model=model, tokenizer=None, info=describe(model, f"tiny-{arch}", "tiny", "random-init"))


def _batch(split="heldout", n_seqs=4, seq_len=16, seed=1):
    ids = torch.randint(3, 128, (n_seqs, seq_len), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(input_ids=ids, source="test", split=split, n_documents=1)


# ----- quality ---------------------------------------------------------------------------------------------------
def test_empty_plan_has_no_quality_change():
    report = validate_plan(_loaded(), {}, _batch(), measure_speed=False)
    q = report.quality
    assert q["ppl_change"] == 0.0 and abs(q["kl_mean"]) < 1e-12 and q["top1_agreement"] == 1.0
    assert report.passed


def test_quality_metrics_equal_a_direct_computation():
    loaded = _loaded()
    batch = _batch()
    report = validate_plan(loaded, PLAN, batch, measure_speed=False, batch_size=3)  # uneven micro-batches
    ids = batch.input_ids
    with torch.no_grad():
        base = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1].double(), -1).numpy()
        with share_attention(loaded.model, PLAN):
            patched = torch.log_softmax(loaded.model(input_ids=ids).logits[:, :-1].double(), -1).numpy()
    targets = ids[:, 1:].numpy()
    rows, cols = np.indices(targets.shape)
    nll_base = -base[rows, cols, targets].mean()
    nll_patched = -patched[rows, cols, targets].mean()
    kl = (np.exp(base) * (base - patched)).sum(-1).mean()
    agree = (base.argmax(-1) == patched.argmax(-1)).mean()
    q = report.quality
    assert q["n_tokens"] == targets.size
    assert q["ppl_baseline"] == pytest.approx(math.exp(nll_base), rel=1e-5)
    assert q["ppl_patched"] == pytest.approx(math.exp(nll_patched), rel=1e-5)
    assert q["ppl_change"] == pytest.approx(math.exp(nll_patched - nll_base) - 1, rel=1e-4, abs=1e-6)
    assert q["kl_mean"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert q["top1_agreement"] == pytest.approx(agree)


def test_pass_fail_follows_the_tolerance():
    loaded, batch = _loaded(), _batch()
    plan = {3: 2}  # on this random model, a plan that raises perplexity (others lower it by chance)
    change = validate_plan(loaded, plan, batch, measure_speed=False).ppl_change
    assert change > 0
    assert validate_plan(loaded, plan, batch, measure_speed=False, tolerance=change * 1.01).passed
    assert not validate_plan(loaded, plan, batch, measure_speed=False, tolerance=change * 0.99).passed


def test_bad_inputs_are_refused():
    loaded = _loaded()
    with pytest.raises(UserError, match="held-out"):
        validate_plan(loaded, PLAN, _batch(split="calibration"))
    with pytest.raises(UserError, match="tolerance"):
        validate_plan(loaded, PLAN, _batch(), tolerance=-1)
    with pytest.raises(UserError, match="30-layer model"):
        validate_plan(loaded, SharePlan.from_spans("20-22", 30), _batch())
    with pytest.raises(UserError, match="made for other-model"):
        validate_plan(loaded, SharePlan(4, [2, 3], model={"name": "other-model"}), _batch())


# ----- speed, memory, the report file ------------------------------------------------------------------------------
def test_speed_block_measures_kv_bytes_and_throughput(tmp_path):
    report = validate_plan(_loaded(), "2-3", _batch(), speed_new_tokens=2, speed_repeats=1)
    speed = report.speed
    for side in ("baseline", "patched"):
        assert speed[side]["prefill_tokens_per_s"] > 0 and speed[side]["decode_tokens_per_s"] > 0
        assert speed[side]["peak_memory_bytes"] is None  # CPU
        assert "compiled_decode_tokens_per_s" not in speed[side]  # compiled decoding is measured on a GPU
    assert speed["mode"] == "infer"  # a fast-mode validation times the inference path
    assert speed["patched"]["k_cache_bytes"] * 2 == speed["baseline"]["k_cache_bytes"]  # 2 of 4 layers keep no K
    assert speed["ratio"]["kv_cache_bytes"] == pytest.approx(0.75)
    assert report.predicted["kv_cache_fraction_saved"] == pytest.approx(0.25)
    assert "CUDA" in speed["peak_memory_note"]
    assert "on a GPU only" in speed["compiled_note"]  # the report says why the compiled column is missing

    path = report.save(tmp_path / "validation.json")
    again = ValidationReport.load(path)
    assert again.to_dict() == json.loads(path.read_text())
    assert again.passed == report.passed and again.plan["followers"] == [2, 3]
    with pytest.raises(UserError, match="not an sa-analysis validation report"):
        ValidationReport.load(tmp_path / "nope.json") if (tmp_path / "nope.json").write_text("{}") else None


def test_compiled_decoding_asked_for_where_it_cannot_run_is_refused_in_one_sentence():
    from sa_analysis.validate.speed import compare_speed, compiled_decode_unavailable

    loaded = _loaded()
    with pytest.raises(UserError, match="Compiled decoding cannot be timed here: .*on a GPU only"):
        compare_speed(loaded.model, PLAN, torch.zeros(1, 8, dtype=torch.long), n_new=2, repeats=1, compiled=True)
    plain = torch.nn.Linear(2, 2)  # a module transformers does not compile whole
    assert "does not compile Linear's decode step" in compiled_decode_unavailable(plain, torch.device("cuda"))


# ----- the search loop ---------------------------------------------------------------------------------------------------
def _report(n_layers=4, kl=None):
    kl = np.full((n_layers, n_layers), 0.5) if kl is None else kl
    model = {"name": "tiny-llama", "n_layers": n_layers, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "hidden_size": 64}
    return AttentionReport(meta={"model": model},
                           arrays={"kl_layers": kl[None]})


def test_search_refuses_a_report_of_another_model():
    with pytest.raises(UserError, match="6-layer model"):
        search_plans(_loaded(), _report(n_layers=6), _batch("calibration"), _batch())


# ----- lm-evaluation-harness ------------------------------------------------------------------------------------------------
def test_tasks_without_lm_eval_say_how_to_install(monkeypatch, default_tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(UserError, match="pip install lm-eval"):
        run_tasks(tiny_model("llama"), default_tokenizer, ["sa_tiny_mc"])


# ----- memory flat in the vocabulary ----------------------------------------------------------------------------------
def test_quality_is_the_same_in_any_micro_batches_and_position_chunks(monkeypatch):
    """The baseline keeps final hidden states, never [S, T, V] log-probabilities: they are remade chunk by chunk of
    positions, so memory stays flat in the vocabulary and the numbers do not depend on the chunking."""
    from sa_analysis.damage import logprobs as compare
    from sa_analysis.validate import quality

    model = tiny_model("llama", dtype=torch.float32, vocab_size=4096)
    ids = torch.randint(3, 4096, (4, 40), generator=torch.Generator().manual_seed(0))
    plan = {2: 1, 3: 1}
    expected = quality.measure_quality(model, plan, quality.untouched(model, ids, batch_size=4))
    monkeypatch.setattr(compare, "POSITION_CHUNK", 7)  # the comparison in chunks of positions
    got = quality.measure_quality(model, plan, quality.untouched(model, ids, batch_size=2))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key  # float32 sums in another order
    assert expected["kl_mean"] > 0 and expected["top1_agreement"] < 1
    assert expected["ppl_change_low"] < expected["ppl_change"] < expected["ppl_change_high"]


# ----- passkey retrieval (built in) ----------------------------------------------------------------------------------------
def test_passkey_prompts_hide_the_key_at_each_depth_and_length(default_tokenizer):
    from sa_analysis.validate.passkey import DEPTHS, passkey_lengths, passkey_prompts

    tokenizer = default_tokenizer
    assert passkey_lengths(8192) == [1024, 2048, 4096, 8192] and passkey_lengths(1024) == [256, 512, 1024]
    prompts = passkey_prompts(tokenizer, [300, 600], samples=2)
    assert len(prompts) == 2 * len(DEPTHS) * 2 and {len(p["ids"]) for p in prompts} == {300, 600}
    assert passkey_prompts(tokenizer, [300]) == passkey_prompts(tokenizer, [300])  # the same every run
    for p in prompts:
        text = tokenizer.decode(p["ids"])
        key = tokenizer.decode(p["ids"][-p["key_len"]:]).strip()
        assert len(key) == 5 and key.isdigit() and text.count(key) == 3  # twice in the needle, once as the answer
        where = text.index("The pass key is") / len(text)
        assert abs(where - p["depth"]) < 0.25  # the needle sits at its depth of the filler


def test_passkey_task_names_are_checked_without_lm_eval(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # built-in tasks need no lm-eval
    from sa_analysis.validate import check_tasks

    assert check_tasks(["passkey", "passkey@1024"]) == ["passkey", "passkey@1024"]
    with pytest.raises(UserError, match="did you mean passkey"):
        check_tasks(["paskey"])
    with pytest.raises(UserError, match="passkey@N"):
        check_tasks(["passkey@big"])


@pytest.mark.slow
def test_default_model_retrieves_passkeys_and_a_random_model_does_not(default_model):
    from sa_analysis.validate import run_tasks

    found = run_tasks(default_model.model, default_model.tokenizer, ["passkey@512"], limit=1)["passkey@512"]
    assert found["acc"] >= 0.8 and set(found) >= {"acc_len256", "acc_len512", "acc_depth50"}  # SmolLM2-135M finds it
    model = tiny_model("llama", dtype=torch.float32, vocab_size=default_model.info.vocab_size, max_position_embeddings=512)
    assert run_tasks(model, default_model.tokenizer, ["passkey@512"], limit=1)["passkey@512"]["acc"] == 0.0


# ----- the real default model and the CLI ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_validate_run(default_model):
    from sa_analysis.data import token_batch

    batch = token_batch(default_model.tokenizer, split="heldout", n_seqs=2, seq_len=64)
    try:
        import lm_eval  # noqa: F401
        tasks = ["sa_tiny_mc"]
    except ImportError:
        tasks = None
    report = validate_plan(default_model, "20-22", batch, tasks=tasks, task_limit=4, speed_new_tokens=2, speed_repeats=1)
    assert report.quality["n_tokens"] == 2 * 63 and report.quality["ppl_change"] != 0
    assert report.speed["ratio"]["kv_cache_bytes"] == pytest.approx(1 - 3 / 60)
    assert report.predicted["attn_proj_fraction_saved"] > 0
    if tasks:
        for side in ("baseline", "patched"):
            assert 0.0 <= report.tasks[side]["sa_tiny_mc"]["acc"] <= 1.0


@pytest.mark.slow
def test_cli_validate(tmp_path, default_model):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    args = ["validate", "--n-seqs", "1", "--seq-len", "32", "--no-speed", "--out", str(tmp_path)]
    # ten shallow layers shared: far past the 5 % default tolerance on this 135M model (it loses ~3x perplexity)
    result = runner.invoke(app, args + ["--spans", "1-10"])
    assert result.exit_code == 3, result.output  # 3: the plan ran and failed the tolerance
    assert "FAIL" in result.output and "perplexity" in result.output
    saved = ValidationReport.load(tmp_path / "validation.json")
    assert not saved.passed and saved.quality["ppl_change"] > 0.05 and saved.tolerance == 0.05
    assert saved.plan["followers"] == list(range(1, 11)) and saved.data["split"] == "heldout"
    lenient = runner.invoke(app, args + ["--spans", "1-10", "--tolerance", "1000"])
    assert lenient.exit_code == 0 and "PASS" in lenient.output, lenient.output
    assert ValidationReport.load(tmp_path / "validation.json").passed

    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "exactly one of --plan" in result.output

    SharePlan.from_spans("2-3", 4).save(tmp_path / "plan.json")
    result = runner.invoke(app, args + ["--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 1 and "4-layer model" in result.output
