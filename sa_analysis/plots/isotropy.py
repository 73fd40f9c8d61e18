"""Isotropy along depth (similarity of each layer to the next w layers, head structure, Block Influence, entropy) and
head alignment between two layers."""

from __future__ import annotations

from typing import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..errors import UserError
from ..report import AttentionReport, metric as lookup_metric
from .style import PALETTE, SHORT, colorbar, compare_note, draw_matrix, draw_standard_error, finish_line_panel, limits, mark_infinite, new_figure, reports_and_labels, run_note, set_layer_ticks, paper_style



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
    vmin, vmax = limits(finite, info.similarity)
    errors = report.head_matrix_se(metric, layer_a, layer_b)  # sampled rows: drawn beside
    with paper_style():
        side = float(np.clip(1.6 + 0.12 * n_heads, 2.2, 3.6))
        fig = new_figure((side + 1.3) * (2 if errors is not None else 1), side + 1.0)
        ax, se_ax = fig.subplots(1, 2) if errors is not None else (fig.add_subplot(), None)
        image, has_inf = draw_matrix(ax, cross, metric, vmin, vmax, annotate if annotate is not None else n_heads <= 12)
        for h, g in enumerate(result["assignment"]):
            ax.add_patch(Rectangle((g - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2.4))
            ax.add_patch(Rectangle((g - 0.5, h - 0.5), 1, 1, fill=False, edgecolor="#d55e00", linewidth=1.3))
        corner = np.arange(n_heads) - 0.3  # top-left corner of the diagonal cells, clear of the cell values
        ax.plot(corner, corner, linestyle="none", marker="o", markersize=2.4,
                markerfacecolor="white", markeredgecolor="black", markeredgewidth=0.5)
        set_layer_ticks(ax, n_heads)
        ax.set_xlabel(f"head of layer {layer_b}")
        ax.set_ylabel(f"head of layer {layer_a}")
        colorbar(fig, image, ax, metric, [cross], vmin, vmax, has_inf, skip_diagonal=False)
        if se_ax is not None:
            draw_standard_error(fig, se_ax, errors, metric)
            set_layer_ticks(se_ax, n_heads)
            se_ax.set_xlabel(f"head of layer {layer_b}")
            se_ax.set_ylabel(f"head of layer {layer_a}")
            se_ax.set_title("standard error (sampled rows)")
        handles = [Patch(facecolor="none", edgecolor="#d55e00", linewidth=1.3, label="best matching (Hungarian)"),
                   matplotlib.lines.Line2D([], [], linestyle="none", marker="o", markersize=3, markerfacecolor="white",
                                           markeredgecolor="black", markeredgewidth=0.5, label="same index")]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, columnspacing=1.2, handletextpad=0.4)
        better = "higher" if info.similarity else "lower"
        ax.set_title(f"{report.model_name}: heads of layer {layer_a} vs layer {layer_b}, {SHORT.get(metric, metric)}\n"
                     f"aligned {result['aligned']:.3g} vs index-matched {result['index_matched']:.3g} ({better} is closer)")
    return fig


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
    with paper_style():
        fig = new_figure(6.2, 0.45 + 1.55 * len(panels))
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
                    any_inf |= mark_infinite(ax, x, curve, colour, i)
                ax.set_ylabel(f"{SHORT.get(metric, metric)}\nl to next w layers")
                ax.set_title(f"{run_note(report)}: isotropy, mean {SHORT.get(metric, metric)} of layer l to its next w layers{direction}", loc="left")
            elif panel == "heads":
                within = report.within_layer_head_similarity(metric)
                if np.isfinite(within).any():
                    ax.plot(x, within, color=PALETTE[3], marker="s", markersize=2, label="heads of one layer\n(mean over pairs)")
                if n > 1:
                    aligned, matched = report.adjacent_alignment(metric)
                    mid = x[:-1] + 0.5
                    ax.plot(mid, matched, color=PALETTE[6], linestyle="--", label="layer l vs l+1,\nheads by index")
                    ax.plot(mid, aligned, color=PALETTE[4], label="layer l vs l+1,\nheads aligned (Hungarian)")
                    any_inf |= mark_infinite(ax, mid, matched, PALETTE[6], 0)
                    any_inf |= mark_infinite(ax, mid, aligned, PALETTE[4], 1)
                ax.set_ylabel(f"head {SHORT.get(metric, metric)}")
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
            finish_line_panel(ax, any_inf, n)
            if any_inf:  # headroom for the ∞ markers above the data
                lo, hi = ax.get_ylim()
                ax.set_ylim(lo, hi + 0.3 * (hi - lo))
        for ax in axes[:-1]:
            ax.tick_params(labelbottom=False)
        set_layer_ticks(axes[-1], n, axis="x")
        axes[-1].set_xlabel("layer l")
    return fig


def plot_compare_isotropy(reports: Sequence[AttentionReport], labels: Sequence[str] | None = None,
                          metric: str = "cosine_flat") -> Figure:
    """Adjacent-layer similarity (`metric` between layer l and l+1, head mean) of several reports overlaid, one line
    per checkpoint with a ±1 std band over sequences: where each checkpoint's attention stays alike from layer to layer."""
    info = lookup_metric(metric)
    reports, labels = reports_and_labels(reports, labels, "plot_compare_isotropy")
    short = SHORT.get(metric, metric)
    ylabel = f"{short}, l vs l+1" if info.similarity else "KL(l+1 ‖ l) [nats]"
    with paper_style():
        fig = new_figure(5.2, 2.4)
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
            any_inf |= mark_infinite(ax, x, curve, colour, i)
        finish_line_panel(ax, any_inf, n_max - 1)
        set_layer_ticks(ax, n_max - 1, axis="x")
        ax.set_xlabel("layer l (compared with layer l+1)")
        ax.set_ylabel(ylabel)
        bands = " (bands: ± 1 std over sequences)" if any(r.array(f"{metric}_layers").shape[0] > 1 for r in reports) else ""
        ax.set_title(f"Adjacent layers, {short}, head mean{compare_note(reports)}{bands}", loc="left")
    return fig


def most_misaligned_pair(report: AttentionReport, metric: str = "cosine_flat") -> int:
    """The layer l where matching the heads of l and l+1 one-to-one (Hungarian) gains the most over matching them by
    index: the pair `write_heatmap_figures` draws in head_alignment.*."""
    return _most_misaligned_pair(report, metric)


def _most_misaligned_pair(report: AttentionReport, metric: str) -> int:
    """The layer l where aligning heads of l and l+1 gains the most over matching them by index."""
    aligned, matched = report.adjacent_alignment(metric)
    gain = aligned - matched if lookup_metric(metric).similarity else matched - aligned
    gain = np.where(np.isfinite(gain), gain, -np.inf)
    return int(np.argmax(gain)) if gain.size else 0
