"""The distillation heal and the three yardsticks: the KL loss with known answers, the teacher is exactly the untouched
model (adapters off, patch lifted), faithfulness (KL to the untouched model, top-1 agreement) equals an independent
float64 computation (tests/test_heldout.py), a distilled heal moves the shared model toward the untouched one, what a full fine-tune trains,
and the user mistakes."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sa_analysis.errors import UserError
from sa_analysis.heal import HealConfig, full_parameters, heal
from sa_analysis.heal.distill import lm_loss, token_kl, untouched_teacher
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.patch import share_attention
from sa_analysis.planner import SharePlan
from test_heal import PLAN, SEQ, VOCAB, config, heldout, text_data, tiny_loaded, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_token_kl_known_answers():
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))  # [1, 2, 2]
    student = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]]]))
    second = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    mask = torch.ones(1, 2)
    assert token_kl(student, teacher, mask).item() == pytest.approx(second / 2, rel=1e-6)
    assert token_kl(student, teacher, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-7)  # padding
    assert token_kl(teacher + 3.0, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)  # logits, not probabilities
    labels = torch.tensor([[0, 1]])  # predicted at position 0: token 1, with probability 0.5
    assert lm_loss(teacher, labels).item() == pytest.approx(math.log(2), rel=1e-6)


def test_suspended_patch_is_the_untouched_model_and_comes_back():
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = _logits(model, ids)
    with share_attention(model, PLAN) as handle:
        shared = _logits(model, ids)
        assert not torch.allclose(shared, plain)
        with handle.suspended():
            assert torch.equal(_logits(model, ids), plain)
        assert handle.active and torch.equal(_logits(model, ids), shared)
        with pytest.raises(RuntimeError, match="boom"), handle.suspended():
            raise RuntimeError("boom")
        assert handle.active and torch.equal(_logits(model, ids), shared)
    assert torch.equal(_logits(model, ids), plain)


def test_the_teacher_is_the_untouched_model_while_adapters_train():
    from sa_analysis.heal.params import add_lora

    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    plain = _logits(model, ids)
    peft_model = add_lora(model, PLAN, HealConfig())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # trained adapters: the student moves away
    with share_attention(model, PLAN) as handle:
        teacher = untouched_teacher(model, peft_model, handle)
        assert torch.allclose(teacher(ids, torch.ones_like(ids)), plain, atol=1e-6)
        assert not torch.allclose(_logits(model, ids), plain, atol=1e-2) and handle.active


def test_a_distilled_heal_moves_the_shared_model_toward_the_untouched_one(text_data, heldout):
    report = heal(tiny_loaded(), PLAN, text_data, heldout, config(objective="distill", steps=30, lr=1e-3))
    g = report.gaps("held-out")
    assert report.control == {"status": "untouched"} and report.objective == "distill"
    p = report.evals["held-out"]["perplexity"]
    assert p["control"] == p["baseline"] and g["after"] == pytest.approx(g["after_untouched"])
    assert g["kl_after"] < 0.95 * g["kl_before"] and g["top1_after"] >= g["top1_before"], g  # (a tiny random model)
    assert sum(report.losses[-5:]) < sum(report.losses[:5])  # the logged loss is the KL to the teacher
    assert "KL to the untouched model" in report.summary()
    lm = heal(tiny_loaded(), PLAN, text_data, heldout, config(steps=30, lr=1e-3))
    assert report.gaps("held-out")["kl_after"] < lm.gaps("held-out")["kl_after"]  # the LM heal moves it more


def test_a_full_fine_tune_of_the_followers_values_and_outputs(text_data, heldout):
    recipe = config(objective="distill", method="full", full_scope="followers-vo", steps=20, lr=1e-3)
    loaded = tiny_loaded()
    chosen = full_parameters(loaded.model, PLAN, recipe)
    names = [name for name, _ in chosen]
    assert names and all(any(f"layers.{m}.self_attn.{p}" in n for m in PLAN for p in ("v_proj", "o_proj")) for n in names)
    expected = sum(p.numel() for _, p in chosen)
    report = heal(loaded, PLAN, text_data, heldout, recipe)
    assert report.run["n_trainable"] == expected
    assert report.gaps("held-out")["kl_after"] < report.gaps("held-out")["kl_before"]
    assert full_parameters(tiny_loaded().model, PLAN, config(method="full", train_layers="from-follower"))
    later = {n for n, _ in full_parameters(tiny_loaded().model, PLAN, config(method="full", train_layers="from-follower"))}
    assert not any(".layers.0." in n or ".layers.1." in n for n in later)  # below the first follower: frozen


@pytest.mark.parametrize("settings, message", [
    ({"objective": "distil"}, "did you mean distill"),
    ({"objective": "lm", "lm_weight": 0.5}, "use it with --objective distill"),
    ({"full_scope": "followers-vo"}, "add --full"),
    ({"objective": "distill", "method": "full", "shard": "fsdp"}, "distil with LoRA"),
])
def test_wrong_heal_options(settings, message):
    with pytest.raises(UserError, match=message):
        HealConfig(**settings)


def test_a_distilled_heal_with_nothing_shared_has_nothing_to_teach(text_data, heldout):
    empty = SharePlan.empty(4, model=None, method="nothing")
    with pytest.raises(UserError, match="nothing to teach"):
        heal(tiny_loaded(), empty, text_data, heldout, config(objective="distill"))


def test_cli_refuses_a_wrong_objective_before_anything_is_written(tmp_path):
    from cli.main import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["heal", "--spans", "3-4", "--objective", "distil", "--out", str(out)])
    assert result.exit_code == 1 and "did you mean distill" in result.output and not out.exists()
    result = CliRunner().invoke(app, ["frontier", "--heal-objective", "distill", "--out", str(out)])
    assert result.exit_code == 1 and "--heal-steps" in result.output and not out.exists()


def test_the_frontier_heals_by_distillation_and_names_the_faithful_reach(tmp_path, monkeypatch):
    from cli.main import app
    from sa_analysis.search import Frontier

    from test_frontier import healed_frontier_command

    args, out = healed_frontier_command(tmp_path, monkeypatch, 3, "--heal-objective", "distill")
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "control heal" not in result.output and "Faithful reach" in result.output
    frontier = Frontier.load(out / "frontier.json")
    assert frontier.heal["objective"] == "distill" and frontier.heal["control"] is None
    for point in frontier.points:
        for values in point.healed.values():
            assert values.control == values.baseline and values.kl_after is not None
            assert values.change_untouched == pytest.approx(values.healed / values.baseline - 1)
        assert point.healed_run["n_trainable"] > 0
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
