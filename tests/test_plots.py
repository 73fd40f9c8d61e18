"""Figures from synthetic reports: each plot returns a Figure with the right panels, files are written atomically,
and layer tick labels never overlap. No model, no torch."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from matplotlib.figure import Figure

from sa_analysis.errors import UserError
from sa_analysis.report import AttentionReport
from sa_analysis import plots


def fake_report(n_layers: int = 12, n_heads: int = 4, n_seqs: int = 3, seed: int = 0, sliding: tuple[int, ...] = (2,),
                name: str = "tiny", late_similarity: float = 0.8, seq_noise: float = 0.15) -> AttentionReport:
    """A report with the structure real ones have: late layers attend alike, early ones do not; heads drift and
    get permuted between some layers (so head alignment beats index matching); layers in `sliding` use a sliding
    window, so KL(global follower ‖ sliding anchor) is infinite."""
    rng = np.random.default_rng(seed)
    d = 48
    prototypes = np.abs(rng.normal(size=(n_heads, d)))
    late = np.abs(rng.normal(size=d))
    perm = np.arange(n_heads)
    vectors = np.empty((n_seqs, n_layers, n_heads, d))
    start_late = n_layers // 2
    for l in range(n_layers):
        if l % 3 == 1:
            perm = rng.permutation(n_heads)
        w_late = late_similarity if l >= start_late else 0.1
        for h in range(n_heads):
            base = prototypes[perm[h]] + w_late * 3 * late + (1.5 if l < 2 else 0.3) * np.abs(rng.normal(size=d))
            for s in range(n_seqs):
                vectors[s, l, h] = base + seq_noise * np.abs(rng.normal(size=d))
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    flat = vectors.reshape(n_seqs, n_layers * n_heads, d)
    cos = np.einsum("sid,sjd->sij", flat, flat).reshape(n_seqs, n_layers, n_heads, n_layers, n_heads)
    cos = np.clip(cos, 0.0, 1.0)
    row = cos ** 1.4
    kl = 2.0 * (1.0 - cos) / (cos + 0.1)
    lm = np.arange(n_layers)
    kl *= (1.0 + 0.2 * np.sign(lm[:, None] - lm[None, :]))[None, :, None, :, None]
    for l in range(n_layers):
        kl[:, l, :, l, :] *= 1 - np.eye(n_heads)[None]
    for a in sliding:
        followers = [m for m in range(n_layers) if m not in sliding]
        kl[:, followers, :, a, :] = np.inf  # a global follower attends keys the sliding anchor masks
    arrays: dict[str, np.ndarray] = {}
    for name_, full in (("cosine_flat", cos), ("cosine_row", row), ("kl", kl)):
        arrays[f"{name_}_mean"] = full.mean(axis=0)
        with np.errstate(invalid="ignore"):
            arrays[f"{name_}_std"] = full.std(axis=0)
        arrays[f"{name_}_layers"] = np.stack([np.einsum("lhmh->lm", full[s]) / n_heads for s in range(n_seqs)])
    depth = np.linspace(0, 1, n_layers)
    arrays["entropy"] = (2.0 + 1.2 * depth[None, :, None] + 0.4 * rng.normal(size=(n_seqs, n_layers, n_heads))).clip(0.1)
    arrays["js_adjacent"] = np.abs(rng.normal(0.1, 0.03, size=(n_seqs, n_layers - 1, n_heads)))
    arrays["block_influence"] = (0.05 + 0.4 * np.exp(-8 * depth) + 0.3 * np.exp(-8 * (1 - depth)))[None] \
        + 0.01 * np.abs(rng.normal(size=(n_seqs, n_layers)))
    meta = {"model": {"name": name, "n_layers": n_layers, "n_heads": n_heads},
            "data": {"n_seqs": n_seqs, "seq_len": 64, "source": "x"}}
    return AttentionReport(meta=meta, arrays=arrays)


@pytest.fixture(scope="module")
def report() -> AttentionReport:
    return fake_report()


def n_colorbars(fig: Figure) -> int:
    return sum(1 for ax in fig.axes if hasattr(ax, "_colorbar"))


def n_panels(fig: Figure) -> int:
    return sum(1 for ax in fig.axes if not hasattr(ax, "_colorbar"))


def test_layer_heatmap_each_metric(report):
    for name in ("cosine_flat", "cosine_row", "kl"):
        fig = plots.plot_layer_heatmap(report, name)
        assert isinstance(fig, Figure)
        assert (n_panels(fig), n_colorbars(fig)) == (1, 1)
        ax = fig.axes[0]
        title = ax.get_title()
        assert "tiny" in title and "3 × 64 tokens" in title
        cbar = next(a for a in fig.axes if hasattr(a, "_colorbar"))
        assert cbar.get_ylabel()  # labelled colour bar
        if name == "kl":
            assert ax.get_ylabel() == "follower layer m" and ax.get_xlabel() == "anchor layer a"
            assert "KL(m ‖ a)" in title
            legend = cbar.get_legend()
            assert legend is not None and "∞: masks differ" in [t.get_text() for t in legend.get_texts()]
        else:
            assert ax.get_xlabel() == ax.get_ylabel() == "layer"


def test_layer_heatmap_one_head_into_given_axes(report):
    fig = Figure()
    ax = fig.add_subplot()
    out = plots.plot_layer_heatmap(report, "cosine_flat", ax=ax, head=1, annotate=True)
    assert out is fig
    assert "head 1" in ax.get_title()
    assert len(ax.texts) == 12 * 12  # annotated cells
    with pytest.raises(UserError):
        plots.plot_layer_heatmap(report, "cosine_flat", head=4)
    with pytest.raises(UserError):
        plots.plot_layer_heatmap(report, "nope")


def test_heatmaps_row(report):
    fig = plots.plot_heatmaps(report)
    assert (n_panels(fig), n_colorbars(fig)) == (3, 3)
    only_two = AttentionReport(report.meta, {k: v for k, v in report.arrays.items() if not k.startswith("cosine_row")})
    fig = plots.plot_heatmaps(only_two)
    assert (n_panels(fig), n_colorbars(fig)) == (2, 2)


def test_isotropy_panels(report):
    fig = plots.plot_isotropy_curve(report, "cosine_flat", windows=(1, 2, 4))
    assert (n_panels(fig), n_colorbars(fig)) == (4, 0)  # isotropy, heads, block influence, entropy
    first = fig.axes[0]
    labels = [t.get_text() for t in first.get_legend().get_texts()]
    assert sum(label.startswith("w = ") and "std" not in label for label in labels) == 3
    assert any("std" in label for label in labels)
    assert len(first.collections) == 1  # the ±1 std band for w = 1
    bare = AttentionReport(report.meta, {k: v for k, v in report.arrays.items() if k in ("cosine_flat_layers",)})
    assert n_panels(plots.plot_isotropy_curve(bare)) == 1
    fig = plots.plot_isotropy_curve(report, "kl")  # infinite points do not break it
    assert n_panels(fig) == 4


def test_head_grid(report):
    fig = plots.plot_head_grid(report, "cosine_flat")
    assert (n_panels(fig), n_colorbars(fig)) == (4, 1)
    assert [ax.get_title() for ax in fig.axes[:4]] == [f"head {h}" for h in range(4)]
    images = [ax.images[0] for ax in fig.axes[:4]]
    assert len({im.get_clim() for im in images}) == 1  # one shared colour scale
    odd = fake_report(n_layers=6, n_heads=5, n_seqs=2, seed=1, sliding=())
    assert (n_panels(plots.plot_head_grid(odd, "kl")), n_colorbars(plots.plot_head_grid(odd, "kl"))) == (5, 1)


def test_head_alignment(report):
    fig = plots.plot_head_alignment(report, 3, 4, "cosine_flat")
    assert (n_panels(fig), n_colorbars(fig)) == (1, 1)
    ax = fig.axes[0]
    result = report.head_alignment("cosine_flat", 3, 4)
    assert f"{result['aligned']:.3g}" in ax.get_title() and f"{result['index_matched']:.3g}" in ax.get_title()
    assert len(ax.patches) == 2 * 4  # one box (two outlines) per matched head
    with pytest.raises(UserError):
        plots.plot_head_alignment(report, 0, 12)


def test_compare_heatmaps_share_one_scale(report):
    others = [fake_report(seed=s, late_similarity=w) for s, w in ((1, 0.2), (2, 0.5), (3, 1.0))]
    fig = plots.plot_compare_heatmaps([report, *others], labels=["a", "b", "c", "d"], metric="cosine_flat")
    assert (n_panels(fig), n_colorbars(fig)) == (4, 1)
    assert len({ax.images[0].get_clim() for ax in fig.axes if ax.images}) == 1
    assert [ax.get_title() for ax in fig.axes[:4]] == ["a", "b", "c", "d"]
    fig = plots.plot_compare_heatmaps([report] * 5, metric="kl")
    assert (n_panels(fig), n_colorbars(fig)) == (5, 1)
    with pytest.raises(UserError):
        plots.plot_compare_heatmaps([report], labels=["a", "b"])


def test_write_heatmap_figures(report, tmp_path):
    paths = plots.write_heatmap_figures(report, tmp_path / "figs", formats=("png", "pdf"))
    names = {p.name for p in paths}
    for stem in ("heatmap_cosine_flat", "heatmap_cosine_row", "heatmap_kl", "heatmaps", "isotropy", "head_grid", "head_alignment"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for path in paths:
        assert path.exists() and path.stat().st_size > 1000
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths if p.suffix == ".png")
    assert all(p.read_bytes()[:5] == b"%PDF-" for p in paths if p.suffix == ".pdf")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(names)  # no temp files left
    png_only = plots.write_heatmap_figures(report, tmp_path / "png")
    assert {p.suffix for p in png_only} == {".png"}


def test_save_figure_rejects_unknown_format(report, tmp_path):
    fig = plots.plot_layer_heatmap(report)
    with pytest.raises(UserError):
        plots.save_figure(fig, tmp_path / "x", formats=("bmp",))
    assert list(tmp_path.iterdir()) == []
    assert plots.save_figure(fig, tmp_path / "x.png") == [tmp_path / "x.png"]


def _overlaps(fig: Figure) -> list[str]:
    """Pairs of drawn tick labels (same axis) whose boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for i, ax in enumerate(fig.axes):
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for tick in axis.get_major_ticks()
                     if lo - 1e-9 <= tick.get_loc() <= hi + 1e-9
                     for t in (tick.label1, tick.label2) if t.get_visible() and t.get_text()]
            for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
                if a.overlaps(b):
                    found.append(f"axes {i} {axis.axis_name}: {ta!r} / {tb!r}")
    return found


def test_tick_labels_do_not_overlap_for_32_layers():
    big = fake_report(n_layers=32, n_heads=4, n_seqs=2, seed=5)
    for fig in (plots.plot_layer_heatmap(big, "kl"), plots.plot_heatmaps(big), plots.plot_head_grid(big),
                plots.plot_compare_heatmaps([big, big, big]), plots.plot_isotropy_curve(big)):
        assert _overlaps(fig) == []
    heatmap = plots.plot_layer_heatmap(big, "cosine_flat")
    heatmap.canvas.draw()
    ticks = heatmap.axes[0].get_xticks()
    assert ticks[0] == 0 and len(ticks) < 32 and np.all(np.diff(ticks) == ticks[1] - ticks[0])  # every k-th layer


def test_sampled_reports_draw_their_standard_errors(report):
    """A report from sampled rows shows each matrix's standard error as a matrix of its own."""
    sampled = AttentionReport(meta={**report.meta, "settings": {"rows": {"mode": "sampled", "rows": 96, "of": 320}}},
                              arrays=dict(report.arrays))
    rng = np.random.default_rng(1)
    for name in ("cosine_flat", "cosine_row", "kl"):
        sampled.arrays[f"{name}_layers_se"] = 0.01 * rng.random(report.arrays[f"{name}_layers"].shape)
        sampled.arrays[f"{name}_mean_se"] = 0.01 * rng.random(report.arrays[f"{name}_mean"].shape)
    one = plots.plot_layer_heatmap(sampled, "kl")
    assert n_panels(one) == 2 and n_colorbars(one) == 2
    assert "96 of 320 query rows" in one._suptitle.get_text()
    assert "standard error" in one.axes[1].get_title()
    row = plots.plot_heatmaps(sampled)
    assert n_panels(row) == 6 and n_colorbars(row) == 6
    assert n_panels(plots.plot_layer_heatmap(report, "kl")) == 1  # every row used: one panel, as before
    grid = plots.plot_head_grid(sampled, "kl")  # one more panel: the largest error of any head
    assert n_panels(grid) == report.n_heads + 1 and grid.axes[report.n_heads].get_title() == "largest standard error"
    assert n_panels(plots.plot_head_grid(report, "kl")) == report.n_heads
    assert n_panels(plots.plot_head_alignment(sampled, 3, 4)) == 2
    from sa_analysis.planner import plan_spans

    plan = plan_spans(sampled, budget=2, stability_resamples=0)
    figure = plots.plot_plan_over_heatmap(sampled, plan, "kl")
    assert n_panels(figure) == 2 and "96 of 320 query rows" in figure.axes[1].get_title()
    both = plots.plot_compare_heatmaps([report, sampled], ["all rows", "sampled"], "kl")
    assert both.axes[0].get_title() == "all rows" and "sampled rows: SE ≤" in both.axes[1].get_title()
