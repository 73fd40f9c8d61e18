"""The look every figure shares: paper rc style, palette, colour limits and maps, layer ticks, titles and notes,
and `save_figure` (atomic writes, no pyplot)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..errors import UserError
from ..io import atomic_write
from ..report import AttentionReport, metric as lookup_metric


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
SHORT = {"cosine_flat": "cosine (flat)", "cosine_row": "cosine (row)", "kl": "KL"}


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
    with paper_style():
        for fmt in dict.fromkeys(fmts):
            path = stem.parent / f"{stem.name}.{fmt}"
            atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.03))
            paths.append(path)
    return paths


@contextmanager
def paper_style() -> Iterator[None]:
    """Paper styling for everything created inside (fonts are fixed when an artist is made)."""
    with matplotlib.rc_context(PAPER_RC):
        yield


def panel_axes(fig: Figure, k: int, nrows: int, ncols: int, **shared) -> list:
    """The first k axes of an nrows x ncols grid, row by row; the unused cells are removed."""
    axes = list(fig.subplots(nrows, ncols, squeeze=False, **shared).flat)
    for ax in axes[k:]:
        ax.remove()
    return axes[:k]


def new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A figure on an Agg canvas, outside pyplot (no global state; freed when dropped). `layout="compressed"` packs
    grids of square heatmaps without the gaps plain constrained layout leaves around fixed-aspect axes."""
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.03, h_pad=0.03)
    return fig


def root_figure(ax) -> Figure:
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10
        return ax.figure


def finish_line_panel(ax, any_inf: bool, n_points: int) -> None:
    """Shared look of the line panels: legend outside on the right (with the ∞ entry), light grid, open frame."""
    if any_inf:
        _infinite_legend_entry(ax)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), borderaxespad=0)
    ax.grid(True, axis="y", linewidth=0.4, alpha=0.4)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xlim(-0.5, n_points - 0.5)
    ax.margins(y=0.08)


def reports_and_labels(reports: Sequence[AttentionReport], labels: Sequence[str] | None,
                        what: str) -> tuple[list[AttentionReport], list[str]]:
    """The reports as a list and one label each (default: the model names), or a user error."""
    reports = list(reports)
    if not reports:
        raise UserError(f"{what} needs at least one report.")
    labels = [r.model_name for r in reports] if labels is None else [str(x) for x in labels]
    if len(labels) != len(reports):
        raise UserError(f"Got {len(labels)} labels for {len(reports)} reports; give one label per report.")
    return reports, labels


def available_metrics(report: AttentionReport) -> list[str]:
    from ..report import PAIR_METRICS

    return [m for m in PAIR_METRICS if report.has(f"{m}_layers")]


def run_note(report: AttentionReport) -> str:
    """'model, 8 × 256 tokens' (what the statistics were measured on), and how many rows when they were sampled."""
    n_seqs, seq_len = report.data.get("n_seqs"), report.seq_len
    note = f"{report.model_name}, {n_seqs} × {seq_len} tokens" if n_seqs and seq_len else report.model_name
    sampling = report.sampling
    if sampling:
        note += f" ({sampling['rows']} of {sampling['of']} query rows each)"
    return note


def draw_standard_error(fig: Figure, ax, se: np.ndarray, metric: str, vmax: float | None = None, inset: bool = False):
    """The standard errors of a layer x layer estimate as their own matrix (0 = exact, darker = less certain), with
    a colour bar in the metric's units (`inset`: inside the panel's right margin, so that a grid keeps its layout).
    Returns the image."""
    se = np.asarray(se, dtype=float)
    if vmax is None:
        finite = se[np.isfinite(se)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(se, cmap="Greys", vmin=0.0, vmax=vmax, interpolation="nearest", origin="upper", aspect="equal")
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    unit = " [nats]" if metric == "kl" else ""
    if inset:
        cax = ax.inset_axes([1.04, 0.0, 0.06, 1.0])
        cax.set_in_layout(False)  # drawn in the space right of the panel, which the caller keeps free
        bar = fig.colorbar(image, cax=cax)
        bar.set_label(f"SE{unit}")
    else:
        bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.03, aspect=25)
        bar.set_label(f"standard error{unit}")
    bar.ax.tick_params(labelsize=TICK_FONTSIZE, width=0.5, length=2)
    bar.outline.set_linewidth(0.5)
    bar.ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=4))
    return image


def compare_note(reports: Sequence[AttentionReport]) -> str:
    notes = {r.data.get("n_seqs"): r.seq_len for r in reports}
    if len(notes) == 1:
        (n_seqs, seq_len), = notes.items()
        if n_seqs and seq_len:
            return f", {n_seqs} × {seq_len} tokens each"
    return ""


def metric_title(metric: str) -> str:
    if metric == "kl":
        return "KL(m ‖ a): follower m reusing anchor a"
    return SHORT.get(metric, metric)


def axis_names(metric: str) -> tuple[str, str]:
    """(row label, column label)."""
    if metric == "kl":
        return "follower layer m", "anchor layer a"
    return "layer", "layer"


def limits(finite: np.ndarray, similarity: bool) -> tuple[float, float]:
    """Robust colour limits of finite values: 2nd-98th percentile; a divergence starts at 0, a cosine stops at 1."""
    if finite.size == 0:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, [2, 98]))
    if similarity:
        if hi - lo < 1e-3:  # a flat matrix still gets a readable scale
            lo, hi = lo - 5e-4, hi + 5e-4
        return lo, hi
    return 0.0, max(hi, 1e-6)


def colour_range(matrices: Sequence[np.ndarray], similarity: bool) -> tuple[float, float]:
    """Limits over the off-diagonal cells of all matrices (the diagonal is trivially 1 or 0)."""
    finite = _off_diagonal_finite(matrices)
    return limits(finite, similarity)


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


def draw_matrix(ax, values: np.ndarray, metric: str, vmin: float, vmax: float, annotate: bool | None):
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


def label_layer_axes(ax, n: int, metric: str, xlabel: bool = True, ylabel: bool = True) -> None:
    rows_label, cols_label = axis_names(metric)
    set_layer_ticks(ax, n)
    if xlabel:
        ax.set_xlabel(cols_label)
    if ylabel:
        ax.set_ylabel(rows_label)


def colorbar(fig: Figure, image, ax, metric: str, matrices: Sequence[np.ndarray], vmin: float, vmax: float,
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


def mark_infinite(ax, x: np.ndarray, curve: np.ndarray, colour: str, row: int) -> bool:
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
        fig = root_figure(ax)
        bbox = ax.get_window_extent()
        length_px = bbox.width if axis.axis_name == "x" else bbox.height
        lo, hi = axis.get_view_interval()
        span = abs(hi - lo)
        if span <= 0 or length_px <= 0:
            return None
        return length_px / span * 72.0 / fig.dpi


def set_layer_ticks(ax, n: int, axis: str = "both", max_labels: int | None = None) -> None:
    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        target.set_major_locator(_LayerLocator(n, TICK_FONTSIZE, max_labels))
        target.set_major_formatter(ticker.FormatStrFormatter("%d"))
        target.set_minor_locator(ticker.NullLocator())
    ax.tick_params(labelsize=TICK_FONTSIZE)
