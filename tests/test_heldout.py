"""The one held-out measurement (`damage.heldout`): equal to an independent float64 computation, the same through
`validate`'s quality, the frontier's held-out point and `heal`'s numbers, and the same perplexity printed by the
three commands for the same plan on the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from sa_analysis.damage.heldout import Untouched, measure_heldout
from sa_analysis.patch import share_attention
from test_heal import PLAN, VOCAB

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_faithfulness_equals_an_independent_float64_computation(device):
    model = tiny_model("llama", dtype=torch.float64, device=device)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1)).to(device)
    untouched = Untouched.record(model, ids, batch_size=2)
    base = torch.log_softmax(_logits(model, ids), -1)[:, :-1]  # [S, T-1, V]
    with share_attention(model, PLAN):
        found = measure_heldout(model, untouched).per_sequence()
        shared = torch.log_softmax(_logits(model, ids), -1)[:, :-1]
    kl = (base.exp() * (base - shared)).sum(-1).mean(-1)  # [S]
    top1 = (base.argmax(-1) == shared.argmax(-1)).double().mean(-1)
    nll = -shared.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    assert found["kl"] == pytest.approx(kl.tolist(), rel=1e-9) and min(found["kl"]) > 0
    assert found["top1"] == pytest.approx(top1.tolist()) and found["nll"] == pytest.approx(nll.tolist(), rel=1e-12)
    assert found["untouched_nll"] == pytest.approx((-base.gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)).tolist())
    again = measure_heldout(model, untouched).per_sequence()  # the untouched model against itself, run again
    assert max(again["kl"]) == pytest.approx(0, abs=1e-12) and again["top1"] == [1.0] * 3
    itself = measure_heldout(None, untouched).per_sequence()  # ... and from what was recorded, with no forward
    assert itself["kl"] == [0.0] * 3 and itself["nll"] == pytest.approx(again["nll"], rel=1e-12)



def test_a_plan_shared_for_the_call_is_the_plan_shared_around_it():
    """`measure_heldout(model, untouched, plan)` shares the plan for the call only; its summary (the frontier's
    held-out point) and its quality (`validate`'s) print one perplexity, exp of the mean NLL."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (4, 18), generator=torch.Generator().manual_seed(3))
    untouched = Untouched.record(model, ids, batch_size=3)
    inside = measure_heldout(model, untouched, PLAN)
    with share_attention(model, PLAN):
        around = measure_heldout(model, untouched)
    assert inside.per_sequence() == around.per_sequence()
    assert measure_heldout(model, untouched).kl == pytest.approx([0.0] * 4, abs=1e-12)  # the patch is gone again
    summary, quality = inside.summary(), inside.quality()
    assert summary.perplexity == pytest.approx(quality["ppl_patched"], rel=1e-12)
    assert summary.perplexity == pytest.approx(math.exp(sum(inside.nll) / 4), rel=1e-12)
    assert summary.perplexity_low < summary.perplexity < summary.perplexity_high
    assert quality["ppl_baseline"] == pytest.approx(inside.untouched_perplexity, rel=1e-12)
    assert quality["n_tokens"] == 4 * 17 and quality["kl_max"] >= max(inside.kl)


def test_validate_frontier_and_heal_print_one_perplexity_for_one_plan(tmp_path, monkeypatch):
    """The frontier's plan at budget 2, saved, then validated and healed on the same held-out tokens (the default
    text's held-out part, 3 x 24): the three commands report one perplexity of the shared model (before healing)."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from sa_analysis.planner import SharePlan

    monkeypatch.setattr("sa_analysis.heal.control.cache_root", lambda: tmp_path / "cache")
    folder = tmp_path / "tiny"
    tiny_model("llama", dtype=torch.float32).save_pretrained(folder)
    tokens = ["--n-seqs", "3", "--seq-len", "24"]
    invoke = lambda *args: CliRunner().invoke(app, [str(a) for a in args])  # noqa: E731
    done = invoke("frontier", "--model", folder, "--budgets", "2", *tokens, "--out", tmp_path / "frontier")
    assert done.exit_code == 0, done.output
    point = json.loads((tmp_path / "frontier" / "frontier.json").read_text())["points"][0]
    plan = SharePlan.from_dict(point["plan"])
    assert plan.n_shared == 2
    plan.save(tmp_path / "plan.json")
    done = invoke("validate", "--model", folder, "--plan", tmp_path / "plan.json", *tokens, "--no-speed",
                  "--out", tmp_path / "validate")
    assert done.exit_code == 0, done.output
    printed_by_validate = done.output
    [written] = (tmp_path / "validate").glob("*.json")
    quality = json.loads(written.read_text())["quality"]
    done = invoke("heal", "--model", folder, "--plan", tmp_path / "plan.json", "--text", "pydoc_data.topics", *tokens,
                  "--steps", "1", "--batch-size", "2", "--no-control", "--out", tmp_path / "heal")
    assert done.exit_code == 0, done.output
    healed = json.loads((tmp_path / "heal" / "heal_report.json").read_text())["evals"]["other text"]
    assert healed["text"]["token_sha1"] == json.loads(written.read_text())["data"]["token_sha1"]  # the same tokens
    shared = point["heldout"]["perplexity"]
    assert quality["ppl_patched"] == pytest.approx(shared, rel=1e-6)
    assert healed["perplexity"]["patched"] == pytest.approx(shared, rel=1e-6)
    assert f"{shared:.4g}" in done.output and f"{shared:.4g}" in printed_by_validate  # heal's table and validate's
