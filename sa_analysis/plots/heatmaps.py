"""Layer x layer heatmaps of a report (one metric, several, several checkpoints, each head) and the standard set
that `sa-analyze heatmap` writes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..errors import UserError
from ..report import AttentionReport, metric as lookup_metric
from .isotropy import most_misaligned_pair, plot_head_alignment, plot_isotropy_curve
from .style import PAPER_RC, available_metrics, axis_names, colorbar, colour_range, compare_note, draw_matrix, draw_standard_error, label_layer_axes, metric_title, new_figure, panel_axes, reports_and_labels, root_figure, run_note, save_figure, set_layer_ticks, paper_style



def write_heatmap_figures(report: AttentionReport, out_dir: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write the standard figures of a report into `out_dir`; returns every path written.

    heatmap_<metric>.*   one per metric the report holds (cosine_flat, cosine_row, kl)
    heatmaps.*           those heatmaps side by side (when there are two or more)
    isotropy.*           isotropy curves, head similarity/alignment, block influence and entropy per layer
    head_grid.*          one layer x layer heatmap per head (needs the per-head arrays)
    head_alignment.*     cross-head matrix of the adjacent layer pair that head re-alignment helps most
    """
    out_dir = Path(out_dir)
    metrics = available_metrics(report)
    if not metrics:
        raise UserError("This report holds no layer x layer statistics (cosine_flat, cosine_row or kl); re-run `sa-analyze heatmap`.")
    main = "cosine_flat" if "cosine_flat" in metrics else metrics[0]
    paths: list[Path] = []
    for name in metrics:
        paths += save_figure(plot_layer_heatmap(report, name), out_dir / f"heatmap_{name}", formats)
    if len(metrics) > 1:
        paths += save_figure(plot_heatmaps(report, metrics), out_dir / "heatmaps", formats)
    paths += save_figure(plot_isotropy_curve(report, main), out_dir / "isotropy", formats)
    per_head = next((m for m in [main, *metrics] if report.has(f"{m}_mean")), None)
    if per_head is not None:
        paths += save_figure(plot_head_grid(report, per_head), out_dir / "head_grid", formats)
        if report.n_layers > 1 and report.n_heads > 1:
            layer_a = most_misaligned_pair(report, per_head)
            paths += save_figure(plot_head_alignment(report, layer_a, layer_a + 1, per_head), out_dir / "head_alignment", formats)
    return paths


def plot_layer_heatmap(report: AttentionReport, metric: str = "cosine_flat", ax=None, head: int | None = None,
                       annotate: bool | None = None) -> Figure:
    """Layer x layer heatmap of `report.layer_matrix(metric, head)` (head mean over sequences, or one head).

    Draws into `ax` when given (its figure is returned), else into a new single-column figure. `annotate` writes
    each cell's value (default: only when there are at most 10 layers).
    """
    info = lookup_metric(metric)
    if head is not None and not 0 <= head < report.n_heads:
        raise UserError(f"Head {head} does not exist; this model has heads 0-{report.n_heads - 1}.")
    values = np.asarray(report.layer_matrix(metric, head), dtype=float)
    n = values.shape[0]
    se = report.layer_matrix_se(metric) if head is None else None  # sampled rows: draw the errors beside
    with paper_style():
        se_ax = None
        if ax is None:
            side = float(np.clip(2.0 + 0.03 * n, 2.3, 3.6))
            fig = new_figure((side + 1.25) * (2 if se is not None else 1), side + 0.55)
            ax, se_ax = fig.subplots(1, 2) if se is not None else (fig.add_subplot(), None)
        fig = root_figure(ax)
        vmin, vmax = colour_range([values], info.similarity)
        image, has_inf = draw_matrix(ax, values, metric, vmin, vmax, annotate)
        label_layer_axes(ax, n, metric)
        colorbar(fig, image, ax, metric, [values], vmin, vmax, has_inf)
        scope = "head mean" if head is None else f"head {head}"
        if se_ax is None:
            ax.set_title(f"{run_note(report)}\n{metric_title(metric)}, {scope}")
        else:
            ax.set_title(f"{metric_title(metric)}, {scope}")
            draw_standard_error(fig, se_ax, se, metric)
            label_layer_axes(se_ax, n, metric)
            se_ax.set_title("its standard error (sampled rows)")
            fig.suptitle(run_note(report))
    return fig


def plot_heatmaps(report: AttentionReport, metrics: Sequence[str] = ("cosine_flat", "cosine_row", "kl")) -> Figure:
    """One heatmap panel per metric, side by side (metrics the report does not hold are left out)."""
    for name in metrics:
        lookup_metric(name)
    present = [m for m in metrics if report.has(f"{m}_layers")]
    if not present:
        raise UserError(f"This report holds none of {', '.join(metrics)}; re-run `sa-analyze heatmap` to capture them.")
    n = report.n_layers
    with paper_style():
        panel = float(np.clip(1.5 + 0.01 * n, 1.6, 2.2))
        errors = [report.layer_matrix_se(name) for name in present]
        sampled = all(e is not None for e in errors)  # a second row: the standard error of each panel
        fig = new_figure(len(present) * (panel + 1.05), (panel + 0.75) * (2 if sampled else 1) - (0.3 if sampled else 0))
        grid = fig.subplots(2 if sampled else 1, len(present), squeeze=False)
        for col, name in enumerate(present):
            ax = grid[0][col]
            info = lookup_metric(name)
            values = np.asarray(report.layer_matrix(name), dtype=float)
            vmin, vmax = colour_range([values], info.similarity)
            image, has_inf = draw_matrix(ax, values, name, vmin, vmax, None)
            label_layer_axes(ax, n, name, xlabel=not sampled)
            colorbar(fig, image, ax, name, [values], vmin, vmax, has_inf)
            ax.set_title("KL(m ‖ a), m reuses a" if name == "kl" else metric_title(name))
            if sampled:
                draw_standard_error(fig, grid[1][col], errors[col], name)
                label_layer_axes(grid[1][col], n, name)
                grid[1][col].set_title("± standard error")
        fig.suptitle(f"{run_note(report)}, head mean")
    return fig


def plot_compare_heatmaps(reports: Sequence[AttentionReport], labels: Sequence[str] | None = None,
                          metric: str = "cosine_flat") -> Figure:
    """The Shared Attention paper's figure: one heatmap per report (checkpoints, before/after a fine-tune...),
    one shared colour scale and a single colour bar. `labels` name the panels (default: the model names)."""
    info = lookup_metric(metric)
    reports, labels = reports_and_labels(reports, labels, "plot_compare_heatmaps")
    matrices = [np.asarray(r.layer_matrix(metric), dtype=float) for r in reports]
    vmin, vmax = colour_range(matrices, info.similarity)
    k = len(reports)
    ncols = min(k, 4)
    nrows = math.ceil(k / ncols)
    with paper_style():
        panel = {1: 2.6, 2: 2.3, 3: 1.75}.get(ncols, 1.45)
        fig = new_figure(ncols * (panel + 0.25) + 0.9, nrows * (panel + 0.35) + 0.45, layout="compressed")
        axes = panel_axes(fig, k, nrows, ncols)
        has_inf = False
        image = None
        for i, (ax, values, label, report) in enumerate(zip(axes, matrices, labels, reports)):
            image, inf_here = draw_matrix(ax, values, metric, vmin, vmax, False)
            has_inf |= inf_here
            label_layer_axes(ax, values.shape[0], metric, xlabel=i >= k - ncols, ylabel=i % ncols == 0)
            errors = report.layer_matrix_se(metric)  # sampled rows: the largest standard error under the label
            ax.set_title(label if errors is None else f"{label}\n(sampled rows: SE ≤ {np.nanmax(errors):.2g})")
        colorbar(fig, image, axes, metric, matrices, vmin, vmax, has_inf, aspect=20 * nrows)
        models = {r.model_name for r in reports}
        model = f"{models.pop()}: " if len(models) == 1 and labels != [r.model_name for r in reports] else ""
        fig.suptitle(f"{model}{metric_title(metric)}, head mean{compare_note(reports)}")
    return fig


def plot_head_grid(report: AttentionReport, metric: str = "cosine_flat") -> Figure:
    """One small layer x layer heatmap per head (index-matched across layers), one shared colour scale and bar."""
    info = lookup_metric(metric)
    per_head = np.asarray(report.per_head_layer_matrices(metric), dtype=float)  # [H, L, L]
    errors = report.per_head_layer_matrices_se(metric)  # sampled rows: one more panel, the largest error of any head
    n_heads, n, _ = per_head.shape
    n_panels = n_heads + (errors is not None)
    ncols = math.ceil(math.sqrt(n_panels))
    if errors is not None and n_panels % ncols == 0:
        ncols += 1  # the error panel's colour bar goes in the free place to its right
    nrows = math.ceil(n_panels / ncols)
    vmin, vmax = colour_range(list(per_head), info.similarity)
    with paper_style():
        panel = float(np.clip(6.0 / ncols, 0.9, 1.6))
        fig = new_figure(ncols * panel + 1.1, nrows * (panel + 0.12) + 0.7, layout="compressed")
        fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.03, hspace=0.03)
        axes = panel_axes(fig, n_panels, nrows, ncols, sharex=True, sharey=True)
        has_inf = False
        image = None
        if errors is not None:
            se_ax, axes = axes[-1], axes[:-1]
            draw_standard_error(fig, se_ax, np.asarray(errors, dtype=float).max(axis=0), metric, inset=True)
            set_layer_ticks(se_ax, n, max_labels=3)
            se_ax.set_title("largest standard error", pad=2)
            se_ax.tick_params(labelleft=n_heads % ncols == 0, labelbottom=True)
        for h, ax in enumerate(axes):
            image, inf_here = draw_matrix(ax, per_head[h], metric, vmin, vmax, False)
            has_inf |= inf_here
            set_layer_ticks(ax, n, max_labels=3)
            ax.set_title(f"head {h}", pad=2)
            # tick labels on the outer panels only: left column, and the lowest panel of each column
            ax.tick_params(labelleft=h % ncols == 0, labelbottom=h >= n_panels - ncols)
        rows_label, cols_label = axis_names(metric)
        fig.supxlabel(cols_label, fontsize=PAPER_RC["axes.labelsize"])
        fig.supylabel(rows_label, fontsize=PAPER_RC["axes.labelsize"])
        colorbar(fig, image, axes, metric, list(per_head), vmin, vmax, has_inf, aspect=18 * nrows)
        fig.suptitle(f"{run_note(report)}\n{metric_title(metric)}, per head")
    return fig
