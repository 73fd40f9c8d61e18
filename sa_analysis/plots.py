"""Paper figures drawn from an AttentionReport: layer x layer heatmaps, isotropy curves, per-head grids, head alignment.

matplotlib only (Agg canvas, no pyplot, so no global figure state and no display needed), never torch, never a
model: every figure is a view of the report's arrays. Each `plot_*` function returns a `matplotlib.figure.Figure`;
`save_figure` writes it atomically; `write_heatmap_figures` writes the standard set that `sa-analyze heatmap` makes.

Conventions shared by every heatmap:
    rows and columns are layers, cells are square, layer 0 is top left;
    for KL the row is the follower layer m and the column the anchor layer a, the cell is KL(m ‖ a), the information
    follower m would lose by reusing anchor a's attention; infinite cells (masks differ: sliding window vs global)
    are drawn in grey and noted under the colour bar, never hidden or clipped;
    colour limits are robust percentiles of the off-diagonal cells, with colour-bar arrows when cells lie beyond;
    tick labels are thinned at draw time to the largest density that cannot overlap (every k-th layer for L > 16).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .errors import UserError
from .io import atomic_write
from .report import AttentionReport, metric as lookup_metric

__all__ = [
    "plot_layer_heatmap",
    "plot_heatmaps",
    "plot_isotropy_curve",
    "plot_head_grid",
    "plot_head_alignment",
    "plot_compare_heatmaps",
    "plot_compare_isotropy",
    "plot_attention_map",
    "plot_attention_maps",
    "most_misaligned_pair",
    "write_heatmap_figures",
    "save_figure",
]

DPI = 200
SAVE_FORMATS = ("png", "pdf", "svg")
INF_COLOUR = "#a8a8a8"  # infinite KL: a neutral grey that none of the colour maps used here contains
NAN_COLOUR = "#ffffff"
# seaborn's "colorblind" palette (colour-blind safe), written out: the figures are plain matplotlib, no seaborn/pandas
PALETTE = ("#0173b2", "#de8f05", "#029e73", "#d55e00", "#cc78bc", "#ca9161", "#949494", "#56b4e9")

# Sizes in points for a figure printed at its nominal size (a 7 in wide double-column figure, or 3.5 in single).
PAPER_RC = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "figure.titlesize": 9,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.major.size": 2.5,
    "ytick.major.size": 2.5,
    "xtick.major.pad": 2,
    "ytick.major.pad": 2,
    "axes.titlepad": 4,
    "axes.labelpad": 2,
    "lines.linewidth": 1.3,
    "lines.markersize": 3,
    "legend.frameon": False,
    "legend.handlelength": 1.6,
    "image.interpolation": "nearest",
    "savefig.dpi": DPI,
    "pdf.fonttype": 42,  # TrueType in PDFs: text stays text (editable, searchable), as journals ask
    "ps.fonttype": 42,
    "svg.fonttype": "none",
}
TICK_FONTSIZE = PAPER_RC["xtick.labelsize"]

# Short names for titles and line-plot axes; colour bars use the full label from PAIR_METRICS.
_SHORT = {"cosine_flat": "cosine (flat)", "cosine_row": "cosine (row)", "kl": "KL"}


# ======================================================================================================== saving
def save_figure(fig: Figure, path_stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write `fig` as `<path_stem>.<format>` for each format (png, pdf, svg) at 200 dpi, atomically; returns the paths.

    Each file appears complete or not at all (temp file in the same folder, then `os.replace`).
    """
    if isinstance(formats, str):
        formats = (formats,)
    fmts = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in fmts if f not in SAVE_FORMATS]
    if unknown or not fmts:
        raise UserError(f"Cannot save figures as {', '.join(unknown) or 'nothing'}; choose from {', '.join(SAVE_FORMATS)}.")
    stem = Path(path_stem)
    if stem.suffix.lower().lstrip(".") in SAVE_FORMATS:
        stem = stem.with_suffix("")
    paths = []
    with _style():
        for fmt in dict.fromkeys(fmts):
            path = stem.parent / f"{stem.name}.{fmt}"
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.03))
            paths.append(path)
    return paths


def write_heatmap_figures(report: AttentionReport, out_dir: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write the standard figures of a report into `out_dir`; returns every path written.

    heatmap_<metric>.*   one per metric the report holds (cosine_flat, cosine_row, kl)
    heatmaps.*           those heatmaps side by side (when there are two or more)
    isotropy.*           isotropy curves, head similarity/alignment, block influence and entropy per layer
    head_grid.*          one layer x layer heatmap per head (needs the per-head arrays)
    head_alignment.*     cross-head matrix of the adjacent layer pair that head re-alignment helps most
    """
    out_dir = Path(out_dir)
    metrics = _available_metrics(report)
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
            layer_a = _most_misaligned_pair(report, per_head)
            paths += save_figure(plot_head_alignment(report, layer_a, layer_a + 1, per_head), out_dir / "head_alignment", formats)
    return paths


# ====================================================================================================== heatmaps
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
    with _style():
        if ax is None:
            side = float(np.clip(2.0 + 0.03 * n, 2.3, 3.6))
            fig = _new_figure(side + 1.25, side + 0.55)
            ax = fig.add_subplot()
        fig = _root_figure(ax)
        vmin, vmax = _colour_range([values], info.similarity)
        image, has_inf = _draw_matrix(ax, values, metric, vmin, vmax, annotate)
        _label_layer_axes(ax, n, metric)
        _colorbar(fig, image, ax, metric, [values], vmin, vmax, has_inf)
        scope = "head mean" if head is None else f"head {head}"
        ax.set_title(f"{_run_note(report)}\n{_metric_title(metric)}, {scope}")
    return fig


def plot_heatmaps(report: AttentionReport, metrics: Sequence[str] = ("cosine_flat", "cosine_row", "kl")) -> Figure:
    """One heatmap panel per metric, side by side (metrics the report does not hold are left out)."""
    for name in metrics:
        lookup_metric(name)
    present = [m for m in metrics if report.has(f"{m}_layers")]
    if not present:
        raise UserError(f"This report holds none of {', '.join(metrics)}; re-run `sa-analyze heatmap` to capture them.")
    n = report.n_layers
    with _style():
        panel = float(np.clip(1.5 + 0.01 * n, 1.6, 2.2))
        fig = _new_figure(len(present) * (panel + 1.05), panel + 0.75)
        axes = fig.subplots(1, len(present), squeeze=False)[0]
        for ax, name in zip(axes, present):
            info = lookup_metric(name)
            values = np.asarray(report.layer_matrix(name), dtype=float)
            vmin, vmax = _colour_range([values], info.similarity)
            image, has_inf = _draw_matrix(ax, values, name, vmin, vmax, None)
            _label_layer_axes(ax, n, name)
            _colorbar(fig, image, ax, name, [values], vmin, vmax, has_inf)
            ax.set_title("KL(m ‖ a), m reuses a" if name == "kl" else _metric_title(name))
        fig.suptitle(f"{_run_note(report)}, head mean")
    return fig


def plot_compare_heatmaps(reports: Sequence[AttentionReport], labels: Sequence[str] | None = None,
                          metric: str = "cosine_flat") -> Figure:
    """The Shared Attention paper's figure: one heatmap per report (checkpoints, before/after a fine-tune...),
    one shared colour scale and a single colour bar. `labels` name the panels (default: the model names)."""
    info = lookup_metric(metric)
    reports, labels = _reports_and_labels(reports, labels, "plot_compare_heatmaps")
    matrices = [np.asarray(r.layer_matrix(metric), dtype=float) for r in reports]
    vmin, vmax = _colour_range(matrices, info.similarity)
    k = len(reports)
    ncols = min(k, 4)
    nrows = math.ceil(k / ncols)
    with _style():
        panel = {1: 2.6, 2: 2.3, 3: 1.75}.get(ncols, 1.45)
        fig = _new_figure(ncols * (panel + 0.25) + 0.9, nrows * (panel + 0.35) + 0.45, layout="compressed")
        axes = _panel_axes(fig, k, nrows, ncols)
        has_inf = False
        image = None
        for i, (ax, values, label) in enumerate(zip(axes, matrices, labels)):
            image, inf_here = _draw_matrix(ax, values, metric, vmin, vmax, False)
            has_inf |= inf_here
            _label_layer_axes(ax, values.shape[0], metric, xlabel=i >= k - ncols, ylabel=i % ncols == 0)
            ax.set_title(label)
        _colorbar(fig, image, axes, metric, matrices, vmin, vmax, has_inf, aspect=20 * nrows)
        models = {r.model_name for r in reports}
        model = f"{models.pop()}: " if len(models) == 1 and labels != [r.model_name for r in reports] else ""
        fig.suptitle(f"{model}{_metric_title(metric)}, head mean{_compare_note(reports)}")
    return fig


def plot_head_grid(report: AttentionReport, metric: str = "cosine_flat") -> Figure:
    """One small layer x layer heatmap per head (index-matched across layers), one shared colour scale and bar."""
    info = lookup_metric(metric)
    per_head = np.asarray(report.per_head_layer_matrices(metric), dtype=float)  # [H, L, L]
    n_heads, n, _ = per_head.shape
    ncols = math.ceil(math.sqrt(n_heads))
    nrows = math.ceil(n_heads / ncols)
    vmin, vmax = _colour_range(list(per_head), info.similarity)
    with _style():
        panel = float(np.clip(6.0 / ncols, 0.9, 1.6))
        fig = _new_figure(ncols * panel + 1.1, nrows * (panel + 0.12) + 0.7, layout="compressed")
        fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.03, hspace=0.03)
        axes = _panel_axes(fig, n_heads, nrows, ncols, sharex=True, sharey=True)
        has_inf = False
        image = None
        for h, ax in enumerate(axes):
            image, inf_here = _draw_matrix(ax, per_head[h], metric, vmin, vmax, False)
            has_inf |= inf_here
            _set_layer_ticks(ax, n, max_labels=3)
            ax.set_title(f"head {h}", pad=2)
            # tick labels on the outer panels only: left column, and the lowest panel of each column
            ax.tick_params(labelleft=h % ncols == 0, labelbottom=h >= n_heads - ncols)
        rows_label, cols_label = _axis_names(metric)
        fig.supxlabel(cols_label, fontsize=PAPER_RC["axes.labelsize"])
        fig.supylabel(rows_label, fontsize=PAPER_RC["axes.labelsize"])
        _colorbar(fig, image, axes, metric, list(per_head), vmin, vmax, has_inf, aspect=18 * nrows)
        fig.suptitle(f"{_run_note(report)}\n{_metric_title(metric)}, per head")
    return fig


def plot_head_alignment(report: AttentionReport, layer_a: int, layer_b: int, metric: str = "cosine_flat",
                        annotate: bool | None = None) -> Figure:
    """Cross-head matrix between two layers with the best one-to-one head matching (Hungarian) boxed.

    Rows are heads of `layer_a`, columns heads of `layer_b`; dots mark the index-matched pairs (the diagonal) that
    plain Shared Attention uses. The title compares the aligned and index-matched means.
    """
    info = lookup_metric(metric)
    for layer in (layer_a, layer_b):
        if not 0 <= layer < report.n_layers:
            raise UserError(f"Layer {layer} does not exist; this model has layers 0-{report.n_layers - 1}.")
    result = report.head_alignment(metric, layer_a, layer_b)
    cross = np.asarray(result["cross"], dtype=float)
    n_heads = cross.shape[0]
    # colour limits from all cells: this matrix has no trivial diagonal
    finite = cross[np.isfinite(cross)]
    vmin, vmax = _limits(finite, info.similarity)
    with _style():
        side = float(np.clip(1.6 + 0.12 * n_heads, 2.2, 3.6))
        fig = _new_figure(side + 1.3, side + 1.0)
        ax = fig.add_subplot()
        image, has_inf = _draw_matrix(ax, cross, metric, vmin, vmax, annotate if annotate is not None else n_heads <= 12)
        for h, g in enumerate(result["assignment"]):
            ax.add_patch(Rectangle((g - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2.4))
            ax.add_patch(Rectangle((g - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="#d55e00", linewidth=1.3))
        corner = np.arange(n_heads) - 0.3  # top-left corner of the diagonal cells, clear of the cell values
        ax.plot(corner, corner, linestyle="none", marker="o", markersize=2.4,
                markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.5)
        _set_layer_ticks(ax, n_heads)
        ax.set_xlabel(f"head of layer {layer_b}")
        ax.set_ylabel(f"head of layer {layer_a}")
        _colorbar(fig, image, ax, metric, [cross], vmin, vmax, has_inf, skip_diagonal=False)
        handles = [Patch(facecolor="none", edgecolor="#d55e00", linewidth=1.3, label="best matching (Hungarian)"),
                   matplotlib.lines.Line2D([], [], linestyle="none", marker="o", markersize=3, markerfacecolor="white",
                                           markeredgecolor="black", markeredgewidth=0.5, label="same index")]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, columnspacing=1.2, handletextpad=0.4)
        better = "higher" if info.similarity else "lower"
        ax.set_title(f"{report.model_name}: heads of layer {layer_a} vs layer {layer_b}, {_SHORT.get(metric, metric)}\n"
                     f"aligned {result['aligned']:.3g} vs index-matched {result['index_matched']:.3g} ({better} is closer)")
    return fig


# ===================================================================================================== isotropy
def plot_isotropy_curve(report: AttentionReport, metric: str = "cosine_flat", windows: Iterable[int] = (1, 2, 4)) -> Figure:
    """Per-layer isotropy: mean `metric` of layer l to its next w layers, one line per window (±1 std over sequences
    for w = 1), plus panels for head structure (within-layer head similarity, adjacent layers with heads aligned vs
    matched by index), block influence and attention entropy when the report holds them. Panels share the layer axis.
    """
    info = lookup_metric(metric)
    windows = sorted({int(w) for w in windows})
    if not windows or windows[0] < 1:
        raise UserError("Isotropy windows must be whole numbers of layers, 1 or more.")
    per_seq = np.asarray(report.array(f"{metric}_layers"), dtype=float)  # [S, L, L]
    n_seqs, n, _ = per_seq.shape
    panels = ["isotropy"]
    if report.has(f"{metric}_mean"):
        panels.append("heads")
    if report.has("block_influence"):
        panels.append("block_influence")
    if report.has("entropy"):
        panels.append("entropy")
    x = np.arange(n)
    with _style():
        fig = _new_figure(6.2, 0.45 + 1.55 * len(panels))
        fig.get_layout_engine().set(h_pad=0.04, hspace=0.05)
        axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        direction = "" if info.similarity else " (KL(later ‖ l))"
        for ax, panel in zip(axes, panels):
            any_inf = False
            if panel == "isotropy":
                for i, w in enumerate(windows):
                    colour = PALETTE[i % len(PALETTE)]
                    curve = report.isotropy_curve(metric, w)
                    label = f"w = {w}" + (" (next layer)" if w == 1 else "")
                    ax.plot(x, np.where(np.isfinite(curve), curve, np.nan), color=colour, marker="o", markersize=2, label=label)
                    if w == 1 and n_seqs > 1:
                        adjacent = np.array([per_seq[:, l + 1, l] for l in range(n - 1)]).T  # [S, L-1]
                        with np.errstate(invalid="ignore"):
                            spread = adjacent.std(axis=0)
                        band = np.isfinite(spread) & np.isfinite(curve[:-1])
                        ax.fill_between(x[:-1], np.where(band, curve[:-1] - spread, np.nan), np.where(band, curve[:-1] + spread, np.nan),
                                        color=colour, alpha=0.2, linewidth=0, label=f"w = 1: ± 1 std over {n_seqs} sequences")
                    any_inf |= _mark_infinite(ax, x, curve, colour, i)
                ax.set_ylabel(f"{_SHORT.get(metric, metric)}\nl to next w layers")
                ax.set_title(f"{_run_note(report)}: isotropy, mean {_SHORT.get(metric, metric)} of layer l to its next w layers{direction}", loc="left")
            elif panel == "heads":
                within = report.within_layer_head_similarity(metric)
                if np.isfinite(within).any():
                    ax.plot(x, within, color=PALETTE[3], marker="s", markersize=2, label="heads of one layer\n(mean over pairs)")
                if n > 1:
                    aligned, matched = report.adjacent_alignment(metric)
                    mid = x[:-1] + 0.5
                    ax.plot(mid, matched, color=PALETTE[6], linestyle="--", label="layer l vs l+1,\nheads by index")
                    ax.plot(mid, aligned, color=PALETTE[4], label="layer l vs l+1,\nheads aligned (Hungarian)")
                    any_inf |= _mark_infinite(ax, mid, matched, PALETTE[6], 0)
                    any_inf |= _mark_infinite(ax, mid, aligned, PALETTE[4], 1)
                ax.set_ylabel(f"head {_SHORT.get(metric, metric)}")
                ax.set_title("head structure", loc="left")
            elif panel == "block_influence":
                bi = np.asarray(report.array("block_influence"), dtype=float)  # [S, L]
                mean, std = bi.mean(axis=0), bi.std(axis=0)
                if bi.shape[0] > 1:
                    ax.fill_between(x, mean - std, mean + std, color=PALETTE[2], alpha=0.2, linewidth=0, label="± 1 std over sequences")
                ax.plot(x, mean, color=PALETTE[2], marker="o", markersize=2, label="block influence")
                ax.set_ylabel("block influence\n1 − cos(in, out)")
                ax.set_title("block influence (low: the layer barely changes its input)", loc="left")
            elif panel == "entropy":
                ent = np.asarray(report.array("entropy"), dtype=float).mean(axis=0)  # [L, H]
                ax.fill_between(x, ent.min(axis=1), ent.max(axis=1), color=PALETTE[0], alpha=0.18, linewidth=0, label="range over heads")
                for h in range(ent.shape[1]):
                    ax.plot(x, ent[:, h], color=PALETTE[0], alpha=0.25, linewidth=0.5)
                ax.plot(x, ent.mean(axis=1), color=PALETTE[0], marker="o", markersize=2, label="mean over heads")
                ax.set_ylabel("entropy [nats]")
                ax.set_title("attention entropy (thin lines: single heads)", loc="left")
            _finish_line_panel(ax, any_inf, n)
            if any_inf:  # headroom for the ∞ markers above the data
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, hi + 0.3 * (hi - lo))
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        _set_layer_ticks(axes[-1], n, axis="x")
        axes[-1].set_xlabel("layer l")
    return fig


# ============================================================================================ comparisons
def plot_compare_isotropy(reports: Sequence[AttentionReport], labels: Sequence[str] | None = None,
                          metric: str = "cosine_flat") -> Figure:
    """Adjacent-layer similarity (`metric` between layer l and l+1, head mean) of several reports overlaid, one line
    per checkpoint with a ±1 std band over sequences: where each checkpoint's attention stays alike from layer to layer."""
    info = lookup_metric(metric)
    reports, labels = _reports_and_labels(reports, labels, "plot_compare_isotropy")
    short = _SHORT.get(metric, metric)
    ylabel = f"{short}, l vs l+1" if info.similarity else "KL(l+1 ‖ l) [nats]"
    with _style():
        fig = _new_figure(5.2, 2.4)
        ax = fig.add_subplot()
        any_inf = False
        n_max = 1
        for i, (report, label) in enumerate(zip(reports, labels)):
            colour = PALETTE[i % len(PALETTE)]
            per_seq = np.asarray(report.array(f"{metric}_layers"), dtype=float)  # [S, L, L]
            n = per_seq.shape[1]
            n_max = max(n_max, n)
            x = np.arange(n - 1)
            curve = report.isotropy_curve(metric, 1)[:-1]
            ax.plot(x, np.where(np.isfinite(curve), curve, np.nan), color=colour, marker="o", markersize=2, label=label)
            if per_seq.shape[0] > 1:
                adjacent = np.array([per_seq[:, l + 1, l] for l in range(n - 1)]).T  # [S, L-1]
                with np.errstate(invalid="ignore"):
                    spread = adjacent.std(axis=0)
                band = np.isfinite(spread) & np.isfinite(curve)
                ax.fill_between(x, np.where(band, curve - spread, np.nan), np.where(band, curve + spread, np.nan),
                                color=colour, alpha=0.18, linewidth=0)
            any_inf |= _mark_infinite(ax, x, curve, colour, i)
        _finish_line_panel(ax, any_inf, n_max - 1)
        _set_layer_ticks(ax, n_max - 1, axis="x")
        ax.set_xlabel("layer l (compared with layer l+1)")
        ax.set_ylabel(ylabel)
        bands = " (bands: ± 1 std over sequences)" if any(r.array(f"{metric}_layers").shape[0] > 1 for r in reports) else ""
        ax.set_title(f"Adjacent layers, {short}, head mean{_compare_note(reports)}{bands}", loc="left")
    return fig


def most_misaligned_pair(report: AttentionReport, metric: str = "cosine_flat") -> int:
    """The layer l where matching the heads of l and l+1 one-to-one (Hungarian) gains the most over matching them by
    index: the pair `write_heatmap_figures` draws in head_alignment.*."""
    return _most_misaligned_pair(report, metric)


# ========================================================================================= attention maps
ATTENTION_CMAP = "magma"  # attention weights (probabilities); similarities use viridis, divergences magma_r


def plot_attention_map(probs, title: str | None = None, ax=None, vmin: float = 1e-4) -> Figure:
    """One head's attention matrix `probs` [Q, K] (rows: query positions, columns: key positions), log colour scale.

    `probs` is a numpy array or a tensor, e.g. `AttentionMaps.probs(layer)[0, head]`. Weights below `vmin` are drawn
    at `vmin` (colour-bar arrow); masked keys (weight exactly 0: the future, or outside a sliding window) are white.
    Draws into `ax` when given (its figure is returned, without a colour bar), else into a new figure with one.
    """
    matrix = _as_matrix(probs)
    with _style():
        own = ax is None
        if own:
            fig = _new_figure(3.3, 2.75)
            ax = fig.add_subplot()
        fig = _root_figure(ax)
        image = _draw_attention(ax, matrix, LogNorm(vmin=vmin, vmax=1.0))
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if title:
            ax.set_title(title)
        if own:
            _attention_colorbar(fig, image, ax)
    return fig


def plot_attention_maps(maps: Sequence, titles: Sequence[str] | None = None, ncols: int | None = None,
                        suptitle: str | None = None, vmin: float = 1e-4) -> Figure:
    """A grid of single heads' attention matrices (each [Q, K]) on one log colour scale with one colour bar."""
    matrices = [_as_matrix(m) for m in maps]
    if not matrices:
        raise UserError("plot_attention_maps needs at least one attention matrix.")
    titles = [""] * len(matrices) if titles is None else [str(t) for t in titles]
    if len(titles) != len(matrices):
        raise UserError(f"Got {len(titles)} titles for {len(matrices)} maps; give one title per map.")
    k = len(matrices)
    ncols = min(k, ncols or 4)
    nrows = math.ceil(k / ncols)
    norm = LogNorm(vmin=vmin, vmax=1.0)
    with _style():
        panel = {1: 2.6, 2: 2.2, 3: 1.8}.get(ncols, 1.5)
        fig = _new_figure(ncols * (panel + 0.2) + 0.9, nrows * (panel + 0.3) + (0.4 if suptitle else 0.1), layout="compressed")
        axes = _panel_axes(fig, k, nrows, ncols)
        image = None
        for i, (ax, matrix, title) in enumerate(zip(axes, matrices, titles)):
            image = _draw_attention(ax, matrix, norm)
            if i >= k - ncols:
                ax.set_xlabel("key position")
            if i % ncols == 0:
                ax.set_ylabel("query position")
            if title:
                ax.set_title(title)
        _attention_colorbar(fig, image, axes, aspect=20 * nrows)
        if suptitle:
            fig.suptitle(suptitle)
    return fig


def _as_matrix(probs) -> np.ndarray:
    if hasattr(probs, "detach"):  # a torch tensor, without importing torch here
        probs = probs.detach().float().cpu().numpy()
    matrix = np.asarray(probs, dtype=float)
    if matrix.ndim != 2:
        raise UserError(f"An attention map must be one head's [query, key] matrix; got shape {matrix.shape} "
                        f"(take e.g. maps.probs(layer)[0, head]).")
    return matrix


def _draw_attention(ax, matrix: np.ndarray, norm: LogNorm):
    cmap = matplotlib.colormaps[ATTENTION_CMAP].with_extremes(bad=NAN_COLOUR)
    shown = np.where(matrix > 0, np.maximum(matrix, norm.vmin), np.nan)  # exactly 0: masked key
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", origin="upper", aspect="equal")
    n_q, n_k = matrix.shape
    for axis, n in ((ax.xaxis, n_k), (ax.yaxis, n_q)):
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, integer=True, min_n_ticks=2))
    ax.set_xlim(-0.5, n_k - 0.5)
    ax.set_ylim(n_q - 0.5, -0.5)
    ax.tick_params(labelsize=TICK_FONTSIZE)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return image


def _attention_colorbar(fig: Figure, image, ax, aspect: float = 25):
    bar = fig.colorbar(image, ax=ax, extend="min", fraction=0.06, pad=0.03, aspect=aspect)
    bar.set_label("attention weight (log scale)")
    bar.ax.tick_params(labelsize=TICK_FONTSIZE, width=0.5, length=2)
    bar.outline.set_linewidth(0.5)
    return bar


# ================================================================================================= helpers
@contextmanager
def _style() -> Iterator[None]:
    """Paper styling for everything created inside (fonts are fixed when an artist is made)."""
    with matplotlib.rc_context(PAPER_RC):
        yield


def _panel_axes(fig: Figure, k: int, nrows: int, ncols: int, **shared) -> list:
    """The first k axes of an nrows x ncols grid, row by row; the unused cells are removed."""
    axes = list(fig.subplots(nrows, ncols, squeeze=False, **shared).flat)
    for ax in axes[k:]:
        ax.remove()
    return axes[:k]


def _new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A figure on an Agg canvas, outside pyplot (no global state; freed when dropped). `layout="compressed"` packs
    grids of square heatmaps without the gaps plain constrained layout leaves around fixed-aspect axes."""
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.03, h_pad=0.03)
    return fig


def _root_figure(ax) -> Figure:
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10
        return ax.figure


def _finish_line_panel(ax, any_inf: bool, n_points: int) -> None:
    """Shared look of the line panels: legend outside on the right (with the ∞ entry), light grid, open frame."""
    if any_inf:
        _infinite_legend_entry(ax)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0)
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.4)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(-0.5, n_points - 0.5)
    ax.margins(y=0.08)


def _reports_and_labels(reports: Sequence[AttentionReport], labels: Sequence[str] | None,
                        what: str) -> tuple[list[AttentionReport], list[str]]:
    """The reports as a list and one label each (default: the model names), or a user error."""
    reports = list(reports)
    if not reports:
        raise UserError(f"{what} needs at least one report.")
    labels = [r.model_name for r in reports] if labels is None else [str(x) for x in labels]
    if len(labels) != len(reports):
        raise UserError(f"Got {len(labels)} labels for {len(reports)} reports; give one label per report.")
    return reports, labels


def _available_metrics(report: AttentionReport) -> list[str]:
    from .report import PAIR_METRICS

    return [m for m in PAIR_METRICS if report.has(f"{m}_layers")]


def _run_note(report: AttentionReport) -> str:
    """'model, 8 × 256 tokens' (what the statistics were measured on)."""
    data = report.meta.get("data") or {}
    n_seqs, seq_len = data.get("n_seqs"), data.get("seq_len")
    if n_seqs and seq_len:
        return f"{report.model_name}, {n_seqs} × {seq_len} tokens"
    return report.model_name


def _compare_note(reports: Sequence[AttentionReport]) -> str:
    notes = {(r.meta.get("data") or {}).get("n_seqs"): (r.meta.get("data") or {}).get("seq_len") for r in reports}
    if len(notes) == 1:
        (n_seqs, seq_len), = notes.items()
        if n_seqs and seq_len:
            return f", {n_seqs} × {seq_len} tokens each"
    return ""


def _metric_title(metric: str) -> str:
    if metric == "kl":
        return "KL(m ‖ a): follower m reusing anchor a"
    return _SHORT.get(metric, metric)


def _axis_names(metric: str) -> tuple[str, str]:
    """(row label, column label)."""
    if metric == "kl":
        return "follower layer m", "anchor layer a"
    return "layer", "layer"


def _limits(finite: np.ndarray, similarity: bool) -> tuple[float, float]:
    """Robust colour limits of finite values: 2nd-98th percentile; a divergence starts at 0, a cosine stops at 1."""
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, [2, 98]))
    if similarity:
        if hi - lo < 1e-3:  # a flat matrix still gets a readable scale
            lo, hi = lo - 5e-4, hi + 5e-4
        return lo, hi
    return 0.0, max(hi, 1e-6)


def _colour_range(matrices: Sequence[np.ndarray], similarity: bool) -> tuple[float, float]:
    """Limits over the off-diagonal cells of all matrices (the diagonal is trivially 1 or 0)."""
    finite = _off_diagonal_finite(matrices)
    return _limits(finite, similarity)


def _off_diagonal_finite(matrices: Sequence[np.ndarray], skip_diagonal: bool = True) -> np.ndarray:
    parts = []
    for m in matrices:
        m = np.asarray(m, dtype=float)
        keep = ~np.eye(m.shape[0], m.shape[1], dtype=bool) if skip_diagonal and m.shape[0] > 1 else np.ones(m.shape, dtype=bool)
        vals = m[keep]
        parts.append(vals[np.isfinite(vals)])
    return np.concatenate(parts) if parts else np.empty(0)


def _cmap(metric: str):
    return matplotlib.colormaps[lookup_metric(metric).cmap].with_extremes(bad=INF_COLOUR)


def _draw_matrix(ax, values: np.ndarray, metric: str, vmin: float, vmax: float, annotate: bool | None):
    """imshow a matrix with square cells; infinite cells grey, NaN cells white. Returns (image, any infinite)."""
    values = np.asarray(values, dtype=float)
    infinite = np.isinf(values)
    missing = np.isnan(values)
    cmap = _cmap(metric)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
                      origin="upper", aspect="equal")
    if missing.any():
        ax.imshow(np.where(missing, 1.0, np.nan), cmap=ListedColormap([NAN_COLOUR]), interpolation="nearest", origin="upper")
    if annotate is None:
        annotate = values.shape[0] <= 10
    if annotate:
        _annotate(ax, values, cmap, Normalize(vmin, vmax), metric)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return image, bool(infinite.any())


def _annotate(ax, values: np.ndarray, cmap, norm: Normalize, metric: str) -> None:
    rows, cols = values.shape
    size = 6 if max(rows, cols) <= 8 else 5
    for i in range(rows):
        for j in range(cols):
            v = values[i, j]
            if np.isinf(v):
                text, colour = "∞", "black"
            elif np.isnan(v):
                continue
            else:
                if lookup_metric(metric).similarity or v >= 0.995:
                    text = f"{v:.2f}" if abs(v) < 9.995 else f"{v:.3g}"
                else:
                    text = "0" if v == 0 else ("<.01" if abs(v) < 0.01 else f"{v:.2f}")
                r, g, b, _ = cmap(norm(v))
                colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize=size, color=colour)


def _label_layer_axes(ax, n: int, metric: str, xlabel: bool = True, ylabel: bool = True) -> None:
    rows_label, cols_label = _axis_names(metric)
    _set_layer_ticks(ax, n)
    if xlabel:
        ax.set_xlabel(cols_label)
    if ylabel:
        ax.set_ylabel(rows_label)


def _colorbar(fig: Figure, image, ax, metric: str, matrices: Sequence[np.ndarray], vmin: float, vmax: float,
              has_inf: bool, shrink: float = 1.0, skip_diagonal: bool = True, aspect: float = 25):
    """A labelled colour bar with arrows where cells lie beyond the limits, and the ∞ note below it if needed."""
    finite = _off_diagonal_finite(matrices, skip_diagonal)
    below = finite.size and finite.min() < vmin - 1e-12
    above = finite.size and finite.max() > vmax + 1e-12
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[(bool(below), bool(above))]
    bar = fig.colorbar(image, ax=ax, extend=extend, shrink=shrink, fraction=0.06, pad=0.03, aspect=aspect)
    bar.set_label(lookup_metric(metric).label)
    bar.ax.tick_params(labelsize=TICK_FONTSIZE, width=0.5, length=2)
    bar.outline.set_linewidth(0.5)
    bar.ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=5))
    if has_inf:
        bar.ax.legend(handles=[Patch(facecolor=INF_COLOUR, edgecolor="none", label="∞: masks differ")],
                      loc="upper left", bbox_to_anchor=(-0.2, -0.015), borderaxespad=0, handlelength=1.0,
                      handleheight=1.0, handletextpad=0.3, borderpad=0)
    return bar


def _mark_infinite(ax, x: np.ndarray, curve: np.ndarray, colour: str, row: int) -> bool:
    """Infinite points of a curve as triangles along the top edge (a line cannot show them), one row per curve so
    that curves infinite at the same layer stay distinguishable. Returns whether there were any."""
    inf = np.isposinf(np.asarray(curve, dtype=float))
    if inf.any():
        ax.plot(x[inf], np.full(inf.sum(), 0.95 - 0.07 * row), transform=ax.get_xaxis_transform(), linestyle="none",
                marker="^", color=colour, markersize=3.5, markeredgecolor="black", markeredgewidth=0.3)
    return bool(inf.any())


def _infinite_legend_entry(ax) -> None:
    ax.plot([], [], linestyle="none", marker="^", color="0.55", markersize=3.5, markeredgecolor="black",
            markeredgewidth=0.3, label="∞ (masks differ)")


def _most_misaligned_pair(report: AttentionReport, metric: str) -> int:
    """The layer l where aligning heads of l and l+1 gains the most over matching them by index."""
    aligned, matched = report.adjacent_alignment(metric)
    gain = aligned - matched if lookup_metric(metric).similarity else matched - aligned
    gain = np.where(np.isfinite(gain), gain, -np.inf)
    return int(np.argmax(gain)) if gain.size else 0


# ------------------------------------------------------------------------------------------------- layer ticks
_NICE_STEPS = (1, 2, 4, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000)


class _LayerLocator(ticker.Locator):
    """Ticks at every k-th index 0, k, 2k...: k is the smallest nice step whose labels cannot overlap at the axis'
    drawn length (decided at draw time, so it holds whatever the final figure size), at least 2 for n > 16."""

    def __init__(self, n: int, fontsize: float = TICK_FONTSIZE, max_labels: int | None = None):
        self.n = int(n)
        self.fontsize = float(fontsize)
        self.max_labels = max_labels

    def __call__(self):
        return self.tick_values(0, self.n - 1)

    def tick_values(self, vmin, vmax):
        step = self.step()
        return np.arange(0, self.n, step, dtype=float)

    def step(self) -> int:
        min_step = 2 if self.n > 16 else 1
        digits = len(str(max(self.n - 1, 0)))
        # a label needs its width (x) or height (y) plus a gap of half a character
        need_pt = max(digits * 0.64 * self.fontsize, 1.2 * self.fontsize) + 0.5 * self.fontsize
        per_index_pt = self._points_per_index()
        for step in _NICE_STEPS:
            if step < min_step:
                continue
            if self.max_labels is not None and math.ceil(self.n / step) > self.max_labels:
                continue
            if per_index_pt is None or step * per_index_pt >= need_pt:
                return step
        return _NICE_STEPS[-1]

    def _points_per_index(self) -> float | None:
        axis = self.axis
        if axis is None or axis.axes is None:
            return None
        ax = axis.axes
        fig = _root_figure(ax)
        bbox = ax.get_window_extent()
        length_px = bbox.width if axis.axis_name == "x" else bbox.height
        lo, hi = axis.get_view_interval()
        span = abs(hi - lo)
        if span <= 0 or length_px <= 0:
            return None
        return length_px / span * 72.0 / fig.dpi


def _set_layer_ticks(ax, n: int, axis: str = "both", max_labels: int | None = None) -> None:
    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        target.set_major_locator(_LayerLocator(n, TICK_FONTSIZE, max_labels))
        target.set_major_formatter(ticker.FormatStrFormatter("%d"))
        target.set_minor_locator(ticker.NullLocator())
    ax.tick_params(labelsize=TICK_FONTSIZE)
