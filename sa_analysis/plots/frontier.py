"""The sharing frontier figure: what sharing costs in perplexity against what it saves, one point per budget.

Left, before healing: the prediction (the whole plan measured on calibration tokens, 95 % interval) and the
measurement on held-out text (95 % interval over sequences), against the unshared model; middle, after healing (when
the frontier was healed): the healed shared model on each held-out text against the untouched model and, for an LM
heal, the control (the unshared model healed the same way); right, faithfulness: next-token KL to the untouched model
before and after healing, with the bound of the faithful reach. The tolerance is drawn as a line; other plans at the
same budgets (`baselines`) beside them.
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
    """Draw a `search.frontier.Frontier` (read through its fields). `baselines`: {name: {"saved": [%], "before":
    [% change], "after": {text: [% change]}}} for other plans at the same budgets; default: those the frontier
    measured (`frontier --baselines`, `baseline_series`)."""
    points = sorted(frontier.points, key=lambda p: p.budget)
    baselines = baseline_series(frontier) if baselines is None else baselines
    healed = [p for p in points if p.healed]
    faithful = bool(healed) and all(v.kl_after is not None for p in healed for v in p.healed.values())
    with paper_style():
        fig = new_figure(10.4 if faithful else 7.2 if healed else 4.2, 3.4)
        axes = fig.subplots(1, 3 if faithful else 2 if healed else 1, squeeze=False)[0]  # own y scales: healed models can fall far below the untouched one
        _before(axes[0], frontier, points, baselines or {})
        if healed:
            _after(axes[1], frontier, healed, baselines or {})
        if faithful:
            _faithfulness(axes[2], frontier, healed)
        context = points[0].savings.get("context_len") if points else None
        for axis in axes[:2]:
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


def baseline_series(frontier: Any) -> dict[str, dict[str, Any]]:
    """The baselines the frontier measured beside its plans, as the figure draws them: per method the KV cache saved
    and the held-out % change against the unshared model (`after`, healed baselines per text, is left to callers that
    heal them: `benchmarks/frontier_baselines.py`)."""
    base = frontier.baseline["perplexity"]
    series: dict[str, dict[str, Any]] = {}
    for point in sorted(frontier.points, key=lambda p: p.budget):
        for method, row in (point.baselines or {}).items():
            entry = series.setdefault(method, {"saved": [], "before": [], "after": {}})
            entry["saved"].append(saved_percent(point))
            entry["before"].append(100 * (row.heldout.perplexity / base - 1))
    return series


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
    predicted = [_percent(p.predicted) for p in points]
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
    """The healed shared model on each held-out text against the untouched model and (an LM heal's) the control."""
    x = [saved_percent(p) for p in healed]
    texts = list(healed[0].healed)
    heal = frontier.heal or {}
    objective = heal.get("objective") or (heal.get("config") or {}).get("objective", "lm")
    against = [("untouched", "change_untouched", "after_untouched", PALETTE[3])]
    if objective != "distill":  # a distilled heal's control is the untouched model itself
        against.append(("control", "change", "after", PALETTE[2]))
    for j, text in enumerate(texts):
        marker, style = TEXT_STYLE.get(j, ("o", "-"))
        for name, change, gap, colour in against:
            values = [_healed_percent(p.healed[text], change, gap) for p in healed]
            if all(math.isnan(v[0]) for v in values):
                continue
            mid = [v[0] for v in values]
            axis.errorbar(x, mid, yerr=[[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]], marker=marker,
                          linestyle=style, color=colour, capsize=1.5, elinewidth=0.7, linewidth=1.0,
                          label=f"vs {name}, {text}")
    for i, (name, series) in enumerate(baselines.items()):
        for j, (text, values) in enumerate((series.get("after") or {}).items()):
            if j == 0:
                axis.plot(series["saved"], values, marker=MARKERS[i % len(MARKERS)],
                          color=BASELINE_COLOURS[i % len(BASELINE_COLOURS)], linewidth=0.9, markersize=3,
                          label=f"{name}, {text}", alpha=0.85)
    steps = (heal.get("config") or {}).get("steps")
    versus = "the untouched model" + ("" if objective == "distill" else " and the control (healed alike)")
    axis.set_title(f"after healing ({steps} {objective} steps)\nagainst {versus}")


def _faithfulness(axis: Any, frontier: Any, healed: list) -> None:
    """Next-token KL to the untouched model on each held-out text, before healing (open) and after it (filled), with
    the bound of the faithful reach: how far from the model the user had each plan is."""
    x = [saved_percent(p) for p in healed]
    bound = frontier.within().get("kl_bound") or {}
    for j, text in enumerate(healed[0].healed):
        marker, style = TEXT_STYLE.get(j, ("o", "-"))
        before = [p.healed[text].kl_before for p in healed]
        after = [p.healed[text].kl_after for p in healed]
        axis.plot(x, before, marker=marker, linestyle=style, color=PALETTE[6], markerfacecolor="white", linewidth=0.9,
                  markersize=3.5, label=f"before healing, {text}")
        axis.plot(x, after, marker=marker, linestyle=style, color=PALETTE[0], linewidth=1.0, markersize=3.5,
                  label=f"after healing, {text}")
        if text in bound:
            axis.axhline(bound[text], color=PALETTE[1], linewidth=0.8, linestyle=style, zorder=0)
    axis.set_yscale("log")
    axis.set_xlabel("KV cache saved (%)")
    axis.set_ylabel("next-token KL to the untouched model (nats)")
    axis.set_title("faithfulness: how far from the model you had\n(orange: the faithful reach's bound)")
    axis.legend(frameon=False, loc="lower right", fontsize=6)


def _with_interval(axis: Any, x: list[float], values: list[tuple[float, float, float]], colour: str, label: str,
                   marker: str, style: str, filled: bool = True) -> None:
    mid = [v[0] for v in values]
    low = [v[0] - v[1] for v in values]
    high = [v[2] - v[0] for v in values]
    axis.errorbar(x, mid, yerr=[low, high], color=colour, marker=marker, linestyle=style, capsize=1.5, linewidth=1.0,
                  elinewidth=0.7, label=label, markerfacecolor=colour if filled else "white")


def _healed_percent(values: Any, change: str = "change", gap: str = "after") -> tuple[float, float, float]:
    """(mid, low, high) in % of the healed shared model (a `HealedText`) against a yardstick: the control (`change`,
    `after`) or the untouched model (`change_untouched`, `after_untouched`); no interval: the mid thrice; not
    measured: NaN."""
    if getattr(values, change) is None:
        return (math.nan, math.nan, math.nan)
    mid = 100 * getattr(values, change)
    low, high = getattr(values, f"{gap}_low"), getattr(values, f"{gap}_high")
    return (mid, mid, mid) if low is None else (mid, percent(low), percent(high))


def _percent(values: Any) -> tuple[float, float, float]:
    """(mid, low, high) of exp(NLL change) - 1 in %, of a `Summary`."""
    return percent(values.nll_change), percent(values.nll_change_low), percent(values.nll_change_high)


def _percent_ppl(values: Any, baseline: float) -> tuple[float, float, float]:
    """(mid, low, high) of the perplexity of a held-out `Summary` against `baseline`, in %."""
    return tuple(100 * (p / baseline - 1) for p in (values.perplexity, values.perplexity_low, values.perplexity_high))  # type: ignore[return-value]
