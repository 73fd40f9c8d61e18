"""Plans: a SharePlan drawn over the layer x layer heatmap it was chosen from, and every plan a search tried
(matplotlib only, no model, no torch).

Rows are follower layers, columns the layer whose attention would be reused, so a follower's predicted cost is
the cell (follower, its anchor). Each span is outlined as the square block [anchor..last follower], and the cells
the plan actually pays for (followers x their anchor) are marked.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from ..io import atomic_write
from ..report import AttentionReport, metric as lookup_metric
from .style import PALETTE, draw_standard_error, new_figure, paper_style, save_figure

if TYPE_CHECKING:  # pragma: no cover
    from ..planner import SharePlan
    from ..search import PlanSearch

PLAN_COST_TO_METRIC = {"kl": "kl", "cosine": "cosine_flat", "cosine_row": "cosine_row"}


def heatmap_metric_for(report: AttentionReport, cost: str | None) -> str:
    """The report matrix to draw a plan over: the one its cost came from, else KL, else flat cosine."""
    for name in (PLAN_COST_TO_METRIC.get(cost or ""), "kl", "cosine_flat", "cosine_row"):
        if name and report.has(f"{name}_layers"):
            return name
    return "kl"


def plot_plan_over_heatmap(report: AttentionReport, plan: "SharePlan", metric: str = "kl", path: str | Path | None = None) -> Figure:
    """Draw the head-mean `metric` matrix (follower rows x reused-layer columns) with the plan's spans outlined.

    Only the lower triangle (reused layer before follower) is drawn: Shared Attention only looks backwards.
    Infinite values (KL across different masks) are shown in grey. Saves a PNG atomically when `path` is given.
    """
    info = lookup_metric(metric)
    values = np.asarray(report.layer_matrix(metric), dtype=float)
    n = values.shape[0]
    below = np.tril(np.ones((n, n), dtype=bool), k=-1)
    shown = np.where(below, values, np.nan)
    finite = shown[np.isfinite(shown)]
    with paper_style():  # the paper style of `plots`: legible when printed at its nominal size
        fig = _draw(report, plan, metric, values, shown, below, finite, info, n)
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=200))
    return fig


def _draw(report, plan, metric, values, shown, below, finite, info, n) -> Figure:
    """The heatmap, its colour bar, the span outlines and the legend (inside the paper style)."""
    vmin, vmax = _colour_range(finite, info.similarity)
    size = min(7.0, max(4.5, 0.12 * n + 2.5))
    errors = report.layer_matrix_se(metric)  # sampled rows: the cells' standard errors beside
    width = (size + 1.0) * (1.85 if errors is not None else 1)
    fig = Figure(figsize=(width, size))  # no pyplot: no global state, works under any backend
    ax, se_ax = fig.subplots(1, 2, width_ratios=[1.0, 0.85]) if errors is not None else (fig.add_subplot(), None)
    cmap = matplotlib.colormaps[info.cmap].copy()
    cmap = cmap.with_extremes(bad="white")
    image = ax.imshow(np.where(np.isfinite(shown), shown, np.nan), cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest", origin="upper")
    infinite = below & np.isinf(values)
    if infinite.any():
        ax.imshow(np.where(infinite, 1.0, np.nan), cmap=ListedColormap(["#9e9e9e"]),
                  interpolation="nearest", origin="upper")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label=info.label)

    for anchor, first, last in plan.spans:
        side = last - anchor + 1
        ax.add_patch(Rectangle((anchor - 0.5, anchor - 0.5), side, side, fill=False, edgecolor="#00c8ff", linewidth=1.6))
        ax.add_patch(Rectangle((anchor - 0.5, first - 0.5), 1, last - first + 1, fill=False, edgecolor="#ff2a6d",
                               linewidth=1.1, linestyle="--"))

    aligned = [(m, plan.anchor_of[m]) for m in plan.aligned_followers]
    for follower, anchor in aligned:  # heads reused through a map: the cell shows the index cost, the plan pays less
        ax.plot(anchor, follower, marker="o", markersize=4, color="white", markeredgecolor="black", markeredgewidth=0.6)

    _axes(ax, n)
    handles = [Patch(fill=False, edgecolor="#00c8ff", linewidth=2.2, label="span block [anchor..last follower]"),
               Patch(fill=False, edgecolor="#ff2a6d", linestyle="--", linewidth=1.6, label="cells paid: followers x anchor")]
    if aligned:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=5, color="white", markeredgecolor="black",
                              label="head-aligned (cell: by index)"))
    if infinite.any():
        handles.append(Patch(facecolor="#9e9e9e", label="infinite (masks differ)"))
    ax.legend(handles=handles, loc="upper right", framealpha=0.9)
    ax.set_title(_title(report, plan, metric))
    if se_ax is not None:
        draw_standard_error(fig, se_ax, np.where(below, errors, np.nan), metric)
        _axes(se_ax, n)
        se_ax.set_title(f"standard errors of the cells\n({report.sampling['rows']} of {report.sampling['of']} "
                        f"query rows sampled per sequence)")
    fig.tight_layout()
    return fig


def _colour_range(finite: np.ndarray, similarity: bool) -> tuple[float | None, float | None]:
    """Colour limits robust to a few extreme pairs (KL is heavy tailed): 2nd-98th percentile of the drawn cells."""
    if finite.size == 0:
        return None, None
    lo, hi = np.percentile(finite, [2, 98])
    if similarity:
        return float(lo), float(min(1.0, max(hi, lo + 1e-6)))
    return 0.0, float(max(hi, 1e-6))  # a divergence starts at 0 (identical)


def _axes(ax, n: int) -> None:
    step = 1 if n <= 16 else (2 if n <= 40 else 4)
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("anchor / reused layer")
    ax.set_ylabel("follower layer")
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(n - 0.5, -0.5)


def _title(report: AttentionReport, plan: "SharePlan", metric: str) -> str:
    spans = ", ".join(f"{a}\u2192{f}-{l}" if l > f else f"{a}\u2192{f}" for a, f, l in plan.spans) or "nothing shared"
    if plan.damage is not None:  # chosen by measured damage: the whole plan's measurement is its prediction
        cost = f", next-token KL {plan.damage.kl:.3g} nats measured whole"
    else:
        cost = "" if plan.total_cost is None else f", predicted {plan.cost_name} cost {plan.total_cost:.3g}"
    if plan.head_map:
        cost += f" ({len(plan.head_map)} head-aligned)"
    spans = textwrap.fill(f"anchor\u2192followers: {spans}", width=70)
    return (f"{report.model_name}: {plan.method} plan over head-mean {metric}\n"
            f"{plan.n_shared}/{plan.n_layers} layers shared{cost}\n{spans}")


SEARCH_STYLES = {  # method of a plan the search tried -> marker style
    "single layer": dict(color="0.6", marker=".", s=30), "single layer, aligned": dict(color="0.35", marker="x", s=22),
    "similarity": dict(color=PALETTE[0], marker="o", s=40), "measured damage": dict(color=PALETTE[2], marker="s", s=40)}


def _best_curves(ax, rows) -> None:
    """The best measured plan per layer count, one curve sharing by index and one with head maps (where tried)."""
    for aligned, style in ((False, dict(color="0.25", linestyle="-")), (True, dict(color=PALETTE[2], linestyle="--"))):
        best: dict[int, float] = {}
        for r in rows:
            if r.n_shared and bool(r.aligned) == aligned:
                best[r.n_shared] = min(best.get(r.n_shared, np.inf), 100 * r.ppl_change)
        if len(best) > 1 or (best and aligned):
            xs = sorted(best)
            ax.plot(xs, [best[x] for x in xs], linewidth=1, zorder=1, **style,
                    label="best " + ("with head maps" if aligned else "by head index"))


def plot_search(search: "PlanSearch", path: str | Path) -> Path:
    """Left: quality change (% perplexity, calibration text) vs layers shared for every plan tried, with the
    tolerance. Right: each plan's predicted damage (the span model: spans measured whole, or their followers alone,
    summed) against the same plan measured whole, which shows how far separate spans interact."""
    from matplotlib.ticker import MaxNLocator

    with paper_style():
        fig = new_figure(13.5, 4.5)
        ax, calibration = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
        _predicted_vs_measured(calibration, search.rows)
        for method, style in SEARCH_STYLES.items():
            rows = [r for r in search.rows if r.method == method]
            for aligned in (False, True):
                group = [r for r in rows if bool(r.aligned) == aligned]
                if not group:
                    continue
                hollow = aligned and not method.startswith("single")  # a candidate with head maps: open marker
                marker = {"marker": style["marker"], "s": style["s"], "facecolors": "none", "edgecolors": style["color"]} if hollow else style
                ax.scatter([r.n_shared for r in group], [100 * r.ppl_change for r in group],
                           label=f"{method}, head-aligned" if hollow else method, **marker)
        _best_curves(ax, search.rows)
        ax.axhline(100 * search.tolerance, color=PALETTE[3], linestyle="--", linewidth=1, label=f"tolerance {100 * search.tolerance:g}%")
        if search.best is not None:
            aligned = sorted(int(m) for m in (search.best.get("head_map") or {}))
            best = next(r for r in search.rows if r.key == (tuple(search.best["followers"]), tuple(aligned)))
            ax.scatter([best.n_shared], [100 * best.ppl_change], marker="*", s=220, facecolor="none",
                       edgecolor="black", linewidth=1.2, label=f"chosen: {best.spans}")
        if search.validation is not None:
            held = search.validation
            ax.scatter([len(held.plan["followers"])], [100 * held.ppl_change], marker="D", s=60, facecolor="none",
                       edgecolor="black", linewidth=1.2, label="chosen, on held-out text")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layers shared")
        ax.set_yscale("symlog", linthresh=10)  # linear near the tolerance, logarithmic for the large losses
        low, high = ax.get_ylim()
        ticks = [t for t in (-50, -20, -10, -5, 0, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low <= t <= high]
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_ylabel("perplexity change (%, log scale above 10)")
        ax.set_title("Shared Attention plans tried (calibration text)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", frameon=False)
        return save_figure(fig, path, ("png",))[0]


def _predicted_vs_measured(ax, rows) -> None:
    """Predicted (spans summed) vs measured whole next-token KL, per layer count, with y = x."""
    pairs = [(r.predicted_kl, r.kl_mean, r.n_shared) for r in rows if r.predicted_kl is not None and r.n_shared > 1]
    ax.set_title("Predicted vs measured damage (calibration)")
    ax.set_xlabel("predicted: next-token KL of its spans, summed (nats)")
    ax.set_ylabel("measured: the plan whole (nats)")
    if not pairs:
        ax.text(0.5, 0.5, "no plan of two or more layers\nwith a prediction", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
        return
    counts = sorted({n for _, _, n in pairs})
    for i, n in enumerate(counts):
        group = [(x, y) for x, y, k in pairs if k == n]
        ax.scatter(*zip(*group), s=28, color=PALETTE[i % len(PALETTE)], label=f"{n} layers shared")
    values = [v for x, y, _ in pairs for v in (x, y)]
    low, high = min(values) * 0.9, max(values) * 1.1
    ax.plot([low, high], [low, high], color="0.5", linestyle=":", linewidth=1, label="measured = predicted")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
