"""The sharing frontier figure: what sharing costs in perplexity against what it saves, one point per budget.

Left, before healing: the prediction (the whole plan measured on calibration tokens, 95 % interval) and the
measurement on held-out text (95 % interval over sequences), against the unshared model; right, after healing (when
the frontier was healed): the healed shared model against the control (the unshared model healed the same way) on
each held-out text. The tolerance is drawn as a line; other plans at the same budgets (`baselines`) beside them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from typing import Any, Mapping, Sequence

from ..stats import percent
from .style import PALETTE, new_figure, paper_style, save_figure

MARKERS = ("s", "^", "v", "D", "P", "X")
BASELINE_COLOURS = (PALETTE[3], PALETTE[4], PALETTE[6], PALETTE[5])
TEXT_STYLE = {0: ("o", "-"), 1: ("D", ":")}  # the held-out texts after healing: heal data, other text


def saved_percent(point: Any) -> float:
    """The share of the KV cache a point's plan saves at the plan's context length, in %."""
    return 100 * point.savings["kv_cache_fraction_saved"]


def plot_frontier(frontier: Any, path_stem: str | Path, baselines: Mapping[str, Mapping[str, Any]] | None = None,
                  formats: Sequence[str] = ("png",)) -> list[Path]:
    """Draw a `validate.frontier.Frontier` (read through its fields). `baselines`: {name: {"saved": [%], "before":
    [% change], "after": {text: [% change]}}} for other plans at the same budgets (the benchmark's)."""
    points = sorted(frontier.points, key=lambda p: p.budget)
    healed = [p for p in points if p.healed]
    with paper_style():
        fig = new_figure(7.2 if healed else 4.2, 3.4)
        axes = fig.subplots(1, 2 if healed else 1, sharey=bool(healed), squeeze=False)[0]
        _before(axes[0], frontier, points, baselines or {})
        if healed:
            _after(axes[1], frontier, healed, baselines or {})
        context = points[0].savings.get("context_len") if points else None
        for axis in axes:
            axis.axhline(100 * frontier.tolerance, color=PALETTE[6], linewidth=0.8, linestyle="--", zorder=0)
            axis.axhline(0, color="black", linewidth=0.5, zorder=0)
            axis.set_xlabel(f"KV cache saved at {context} tokens (%)")
            axis.legend(frameon=False, loc="upper left")
            _log_change_axis(axis)
        axes[0].set_ylabel("held-out perplexity change (%, log scale of the ratio)")
        axes[0].set_xlabel(f"KV cache saved at {context} tokens (%); points labelled by layers shared")
        axes[0].annotate(f"tolerance {100 * frontier.tolerance:g}%", (0.99, 100 * frontier.tolerance), fontsize=6,
                         xycoords=("axes fraction", "data"), ha="right", va="bottom", color=PALETTE[6])
        return save_figure(fig, path_stem, formats)


def _log_change_axis(axis: Any) -> None:
    """The y axis as a log scale of the perplexity ratio, labelled in % change: small costs stay readable beside
    large ones. Values are % changes; the axis maps them through log(1 + change)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    axis.set_yscale("function", functions=(lambda y: np.log1p(np.asarray(y) / 100.0),
                                           lambda v: 100.0 * np.expm1(np.asarray(v))))
    low, high = axis.get_ylim()
    low = max(low, min(-5.0, min((min(line.get_ydata(), default=0) for line in axis.get_lines()), default=0) - 5))
    axis.set_ylim(low, high)
    ticks = [t for t in (-50, -20, -10, 0, 10, 25, 50, 100, 200, 400, 800, 1600) if low <= t <= high]
    axis.yaxis.set_major_locator(FixedLocator(ticks))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:+.0f}%" if v else "0"))
    axis.yaxis.set_minor_locator(FixedLocator([]))


def _before(axis: Any, frontier: Any, points: list, baselines: Mapping[str, Mapping[str, Any]]) -> None:
    """Predicted and measured change against the unshared model, each budget labelled by its layer count."""
    x = [saved_percent(p) for p in points]
    predicted = [_percent(p.predicted, "nll_change") for p in points]
    measured = [_percent_ppl(p.heldout, frontier.baseline["perplexity"]) for p in points]
    _with_interval(axis, x, predicted, PALETTE[1], "predicted (calibration)", "o", "--", filled=False)
    _with_interval(axis, x, measured, PALETTE[0], "measured (held-out)", "o", "-")
    for i, (name, series) in enumerate(baselines.items()):
        axis.plot(series["saved"], series["before"], marker=MARKERS[i % len(MARKERS)],
                  color=BASELINE_COLOURS[i % len(BASELINE_COLOURS)], linewidth=0.9, markersize=3, label=name, alpha=0.85)
    for p, xi, (y, _low, _high) in zip(points, x, measured):
        axis.annotate(f"{p.budget}", (xi, y), textcoords="offset points", xytext=(4, -7), ha="left", fontsize=5.5,
                      color=PALETTE[0])
    axis.set_title(f"before healing\nagainst the unshared model (held-out perplexity {frontier.baseline['perplexity']:.3g})")


def _after(axis: Any, frontier: Any, healed: list, baselines: Mapping[str, Mapping[str, Any]]) -> None:
    """The healed shared model against the control on each held-out text."""
    x = [saved_percent(p) for p in healed]
    texts = list(healed[0].healed)
    for j, text in enumerate(texts):
        marker, style = TEXT_STYLE.get(j, ("o", "-"))
        values = [_healed_percent(p.healed[text]) for p in healed]
        mid = [v[0] for v in values]
        axis.errorbar(x, mid, yerr=[[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]], marker=marker,
                      linestyle=style, color=PALETTE[2], capsize=1.5, elinewidth=0.7, linewidth=1.0,
                      label=f"recommended, {text}")
    for i, (name, series) in enumerate(baselines.items()):
        for j, (text, values) in enumerate((series.get("after") or {}).items()):
            if j == 0:
                axis.plot(series["saved"], values, marker=MARKERS[i % len(MARKERS)],
                          color=BASELINE_COLOURS[i % len(BASELINE_COLOURS)], linewidth=0.9, markersize=3,
                          label=f"{name}, {text}", alpha=0.85)
    steps = ((frontier.heal or {}).get("config") or {}).get("steps")
    axis.set_title(f"after healing ({steps} LoRA steps)\nagainst the control (the unshared model healed alike)")


def _with_interval(axis: Any, x: list[float], values: list[tuple[float, float, float]], colour: str, label: str,
                   marker: str, style: str, filled: bool = True) -> None:
    mid = [v[0] for v in values]
    low = [v[0] - v[1] for v in values]
    high = [v[2] - v[0] for v in values]
    axis.errorbar(x, mid, yerr=[low, high], color=colour, marker=marker, linestyle=style, capsize=1.5, linewidth=1.0,
                  elinewidth=0.7, label=label, markerfacecolor=colour if filled else "white")


def _healed_percent(values: Mapping[str, float]) -> tuple[float, float, float]:
    """(mid, low, high) in % of the healed shared model against the control (no interval: the mid thrice)."""
    if values.get("change") is None:
        return (math.nan, math.nan, math.nan)
    mid = 100 * values["change"]
    if values.get("after_low") is None:
        return (mid, mid, mid)
    return (mid, percent(values["after_low"]), percent(values["after_high"]))


def _percent(values: Mapping[str, float], name: str) -> tuple[float, float, float]:
    """(mid, low, high) of exp(NLL change) - 1 in %."""
    return tuple(percent(values[f"{name}{s}"]) for s in ("", "_low", "_high"))  # type: ignore[return-value]


def _percent_ppl(values: Mapping[str, float], baseline: float) -> tuple[float, float, float]:
    return tuple(100 * (values[f"perplexity{s}"] / baseline - 1) for s in ("", "_low", "_high"))  # type: ignore[return-value]
