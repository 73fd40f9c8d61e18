"""Head families: planted duplicate heads of a tiny model come out as one family, the table and the clustermap are
made from a report, a sampled report carries its uncertainty, and `sa-analyze heads` answers mistakes in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from sa_analysis.data import TokenBatch
from sa_analysis.errors import UserError
from sa_analysis.loading import LoadedModel, describe
from sa_analysis.pipeline import analyse
from sa_analysis.planner.families import head_families
from sa_analysis.plots.families import plot_head_families
from sa_analysis.report import AttentionReport

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = [(1, 0), (2, 3), (3, 1), (5, 2)]  # heads made to attend uniformly over the past: the same pattern anywhere


@pytest.fixture(scope="module")
def planted_report(tmp_path_factory) -> AttentionReport:
    """A 6-layer tiny model whose PLANTED heads have zero queries (uniform causal attention, whatever the input)."""
    model = tiny_model("llama", n_layers=6, num_key_value_heads=4)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer, head in PLANTED:
            model.model.layers[layer].self_attn.q_proj.weight[head * head_dim:(head + 1) * head_dim] = 0.0
    loaded = LoadedModel(model=model, tokenizer=None, info=describe(model, "tiny-llama", "tiny", "random-init"))
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    report = analyse(loaded, TokenBatch(ids, "test", "calibration", 1))
    path = tmp_path_factory.mktemp("report") / "report"
    report.save(path)
    return report


def _family_of(families, layer: int, head: int) -> set[tuple[int, int]]:
    rows = families.rows
    label = families.labels[rows.index((layer, head))]
    return {rows[i] for i in np.flatnonzero(families.labels == label)}


def test_planted_duplicate_heads_are_one_family(planted_report):
    families = head_families(planted_report, "cosine_flat", threshold=0.02)
    assert _family_of(families, *PLANTED[0]) == set(PLANTED)
    row = next(r for r in families.table if [1, 0] in r["members"])
    assert row["size"] == 4 and row["layers"] == [1, 2, 3, 5] and row["within"] == pytest.approx(1.0, abs=1e-6)
    assert row["head_maps_follow"] == 1.0  # the Hungarian maps pair the identical heads across layers
    assert "stays_together" not in row  # a report over all rows has no sampling error
    by_kl = head_families(planted_report, "kl", threshold=0.01)
    assert _family_of(by_kl, *PLANTED[0]) == set(PLANTED)


def test_the_clustermap_is_drawn_for_every_head_and_as_a_summary(planted_report, tmp_path, monkeypatch):
    from sa_analysis.plots import families as plots

    families = head_families(planted_report, "cosine_flat", threshold=0.02)
    path = plot_head_families(families, tmp_path / "heads.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(plots, "SUMMARY_ROWS", 8)  # as for a model of 1,024 heads: families collapsed
    summary = plot_head_families(families, tmp_path / "summary.png")
    assert summary.read_bytes()[:4] == b"\x89PNG" and summary.stat().st_size != path.stat().st_size
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # seaborn's figures are closed once saved


def test_a_sampled_report_says_how_often_families_stay_together(planted_report):
    arrays = dict(planted_report.arrays)
    arrays["cosine_flat_mean_se"] = np.full_like(arrays["cosine_flat_mean"], 1e-4)
    noisy = AttentionReport(meta=planted_report.meta, arrays=arrays)
    families = head_families(noisy, "cosine_flat", threshold=0.02)
    row = next(r for r in families.table if [1, 0] in r["members"])
    assert row["stays_together"] == 1.0  # errors far below the gap to the other heads
    arrays["cosine_flat_mean_se"] = np.full_like(arrays["cosine_flat_mean"], 0.5)
    shaky = head_families(AttentionReport(meta=planted_report.meta, arrays=arrays), "cosine_flat", threshold=0.02)
    assert all(r.get("stays_together", 0.0) < 1.0 for r in shaky.table if [1, 0] in r["members"])


def test_family_options_are_checked():
    from sa_analysis.planner.families import check_family_options

    with pytest.raises(UserError, match="choose cosine_flat"):
        check_family_options("js", None)
    with pytest.raises(UserError, match="must be > 0"):
        check_family_options("kl", 0.0)


def test_cli_heads_from_a_report(planted_report, tmp_path):
    from cli.main import app

    saved = tmp_path / "r"
    planted_report.save(saved / "report")
    result = CliRunner().invoke(app, ["heads", "--report", str(saved / "report.json"), "--threshold", "0.02",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "Head families" in result.output and "L1H0, L2H3, L3H1, L5H2" in result.output
    table = json.loads((tmp_path / "o" / "head_families.json").read_text())
    assert table["threshold"] == 0.02 and any(f["size"] == 4 for f in table["families"])
    bad = CliRunner().invoke(app, ["heads", "--report", str(saved / "report.json"), "--metric", "js",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists()


def test_a_pair_with_no_finite_value_lies_farthest_the_same_way_everywhere():
    """`head_similarity` and the stability draws share one distance: an infinite KL (disjoint supports) lies twice
    as far as the farthest finite pair, a negative drawn KL at 0, and the diagonal at 0."""
    from sa_analysis.planner.families import distance_of

    kl = np.array([[0.0, 0.4, np.inf], [0.4, 0.0, -0.1], [np.inf, -0.1, 0.0]])
    assert distance_of(kl, "kl").tolist() == [[0.0, 0.4, 0.8], [0.4, 0.0, 0.0], [0.8, 0.0, 0.0]]
    cosine = np.array([[1.0, 0.75, np.nan], [0.75, 1.0, 0.5], [np.nan, 0.5, 1.0]])
    assert distance_of(cosine, "cosine_flat").tolist() == [[0.0, 0.25, 1.0], [0.25, 0.0, 0.5], [1.0, 0.5, 0.0]]
    assert distance_of(np.full((2, 2), np.inf), "kl").tolist() == [[0.0, 1.0], [1.0, 0.0]]
