"""`sa-analyze compare`: two checkpoints of a tiny Llama ("before" and "after" a fine-tune) measured on the same tokens,
the same comparison redrawn from their saved reports, and every user mistake (one sentence, exit code 1, no files)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from sa_analysis.report import AttentionReport
from tests.conftest import tiny_model

runner = CliRunner()
DATA = ("--n-seqs", 2, "--seq-len", 24, "--device", "cpu", "--dtype", "float32")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment: str, out_dir=None):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("Error:"), result.output
    assert fragment in lines[-1], lines[-1]
    assert "Traceback" not in result.output
    if out_dir is not None and out_dir.exists():
        assert list(out_dir.iterdir()) == [], f"partial files left: {list(out_dir.iterdir())}"


def save_checkpoint(folder, n_layers: int = 4, perturb: float = 0.0, seed: int = 0):
    """A tiny random Llama saved as a folder; `perturb` adds noise to every weight (a stand-in for a fine-tune)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    if n_layers == 4:
        model = tiny_model("llama", dtype=torch.float32, seed=seed)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config("llama", n_layers=n_layers), dtype=torch.float32)
    if perturb:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(perturb * param.std() * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return (save_checkpoint(root / "before"), save_checkpoint(root / "after", perturb=0.5),
            save_checkpoint(root / "shallow", n_layers=3))


@pytest.fixture(scope="module")
def compared(checkpoints, tmp_path_factory):
    """`compare --model before --model after` run once; (result, out folder)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    before, after, _ = checkpoints
    result = run("compare", "--model", before, "--model", after, "--label", "before fine-tune", "--label", "after",
                 *DATA, "--out", out)
    return result, out


def test_compare_two_checkpoints(compared):
    result, out = compared
    assert result.exit_code == 0, result.output
    for folder in ("before_fine-tune", "after"):
        report = AttentionReport.load(out / folder / "report.json")
        assert report.n_layers == 4 and report.meta["data"]["n_tokens"] == 48
        assert (out / folder / "heatmap_cosine_flat.png").stat().st_size > 0
    for name in ("compare_cosine_flat.png", "compare_adjacent_cosine_flat.png", "compare_cosine_flat.json"):
        assert (out / name).stat().st_size > 0, name
        assert str(out / name) in result.output.replace("\n", "")
    summary = json.loads((out / "compare_cosine_flat.json").read_text())
    assert [r["label"] for r in summary["rows"]] == ["before fine-tune", "after"]
    assert summary["rows"][0]["token_sha1"] == summary["rows"][1]["token_sha1"]  # same tokens for every checkpoint
    assert summary["rows"][0]["off_diagonal_mean"] != summary["rows"][1]["off_diagonal_mean"]
    assert "before fine-tune" in result.output and "most isotropic" in result.output
    assert "different token ids" not in result.output
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "work folder left behind"


def test_compare_saved_reports_with_kl(compared, tmp_path):
    _, measured = compared
    out = tmp_path / "redraw"
    result = run("compare", "--report", measured / "before_fine-tune" / "report.json",
                 "--report", measured / "after" / "report.json", "--metric", "kl", "--span-len", 3, "--pdf", "--out", out)
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["compare_adjacent_kl.pdf", "compare_adjacent_kl.png", "compare_kl.json", "compare_kl.pdf", "compare_kl.png"]
    rows = json.loads((out / "compare_kl.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["before", "after"]  # default labels: the model names
    assert all(r["span"][1] - r["span"][0] == 2 for r in rows)
    again = run("compare", "--report", measured / "after" / "report.json", "--report", measured / "after" / "report.json",
                "--out", tmp_path / "same")
    assert again.exit_code == 0, again.output
    rows = json.loads((tmp_path / "same" / "compare_cosine_flat.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["after-1", "after-2"]  # two inputs of one name are numbered


def test_compare_models_of_different_depth(checkpoints, compared, tmp_path):
    before, _, shallow = checkpoints
    out = tmp_path / "o"
    assert_user_error(run("compare", "--model", before, "--model", shallow, *DATA, "--out", out),
                      "different numbers of layers", out)
    shallow_report = tmp_path / "shallow"
    assert run("heatmap", "--model", shallow, *DATA, "--out", shallow_report).exit_code == 0
    _, measured = compared
    assert_user_error(run("compare", "--report", measured / "after" / "report.json", "--report",
                          shallow_report / "report.json", "--out", out), "different numbers of layers", out)


def test_compare_mistakes(checkpoints, compared, tmp_path):
    before, after, _ = checkpoints
    _, measured = compared
    report = measured / "after" / "report.json"
    out = tmp_path / "o"
    assert_user_error(run("compare", "--out", out), "two or more inputs", out)
    assert_user_error(run("compare", "--model", before, "--out", out), "two or more inputs", out)
    assert_user_error(run("compare", "--model", before, "--report", report, "--out", out), "not both", out)
    assert_user_error(run("compare", "--report", report, "--report", report, "--label", "a", "--out", out),
                      "one --label per input", out)
    assert_user_error(run("compare", "--report", report, "--report", report, "--label", "a", "--label", "a", "--out", out),
                      "repeat", out)
    assert_user_error(run("compare", "--report", report, "--report", report, "--metric", "dot", "--out", out),
                      "Unknown metric", out)
    assert_user_error(run("compare", "--report", report, "--report", tmp_path / "absent.json", "--out", out),
                      "does not exist", out)
    assert_user_error(run("compare", "--model", before, "--model", tmp_path / "nowhere", *DATA, "--out", out),
                      "does not exist", out)  # a path that is not there is said to be missing


def test_help_lists_the_options():
    result = run("compare", "--help")
    assert result.exit_code == 0
    for flag in ("--model", "--report", "--label", "--metric", "--out", "--n-seqs", "--seq-len", "--text", "--device"):
        assert flag in result.output


def test_library_helpers_for_compare_and_notebooks():
    """The report and plot helpers the compare command and the notebooks call (synthetic arrays, no model)."""
    import numpy as np
    from matplotlib.figure import Figure

    from sa_analysis import plots
    from sa_analysis.errors import UserError
    from sa_analysis.report import compare_summary

    n = 6
    cos = np.full((n, n), 0.3)
    cos[2:5, 2:5] = 0.9  # layers 2-4 attend alike
    np.fill_diagonal(cos, 1.0)
    kl = 1.0 - cos
    kl[:, 0] = np.inf
    meta = {"model": {"name": "toy", "n_layers": n, "n_heads": 1}, "data": {"n_seqs": 2, "seq_len": 8}}
    report = AttentionReport(meta, {"cosine_flat_layers": np.stack([cos, cos]), "kl_layers": np.stack([kl, kl])})
    assert report.most_isotropic_span("cosine_flat", 3) == (2, 4, pytest.approx(0.9))
    assert report.most_isotropic_span("kl", 3)[:2] == (2, 4)
    assert report.off_diagonal_mean("cosine_flat") == pytest.approx(cos[~np.eye(n, dtype=bool)].mean())
    assert np.isfinite(report.off_diagonal_mean("kl"))  # infinite cells left out
    rows = compare_summary([report, report], ["a", "b"], "cosine_flat", span_len=3)
    assert rows[0]["span"] == (2, 4) and rows[0]["adjacent_mean"] == pytest.approx(np.mean([cos[l + 1, l] for l in range(n - 1)]))
    deeper = AttentionReport({**meta, "model": {"name": "deep", "n_layers": n + 1, "n_heads": 1}}, {})
    with pytest.raises(UserError, match="different numbers of layers"):
        compare_summary([report, deeper], ["a", "b"])

    assert isinstance(plots.plot_compare_isotropy([report, report], ["a", "b"], "kl"), Figure)
    probs = torch.softmax(torch.randn(8, 8).masked_fill(torch.ones(8, 8).triu(1).bool(), float("-inf")), dim=-1)
    fig = plots.plot_attention_map(probs, "one head")
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "key position"  # the map and its colour bar
    fig = plots.plot_attention_maps([probs, probs.numpy(), probs], ["a", "b", "c"])
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"] and len(fig.axes) == 4
    with pytest.raises(UserError, match="one head"):
        plots.plot_attention_map(probs[None])


def test_compare_random_init_checkpoints_of_an_alias(tmp_path, monkeypatch):
    """`compare --random-init` measures each alias with random weights (the README's before-training comparison)."""
    import sa_analysis.pipeline.compare as compare_job
    from sa_analysis.errors import UserError

    seen = []

    def fake_heatmap(source, text, capture, *, out, **shown):
        seen.append((source.model, source.random_init))
        raise UserError("stop here")  # the flag reached the measurement; nothing else to test

    monkeypatch.setattr(compare_job, "run_heatmap", fake_heatmap)
    result = run("compare", "--model", "smollm2-135m", "--model", "smollm2-135m", "--random-init", "--out", tmp_path / "o")
    assert result.exit_code == 1 and "stop here" in result.output and seen == [("smollm2-135m", True)], result.output
