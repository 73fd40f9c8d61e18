"""The heal figure: held-out perplexity of baseline, patched and healed, and the training loss per step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .style import PALETTE, new_figure, paper_style, save_figure


BARS = (("baseline", "unshared"), ("control", "unshared, healed\n(control)"), ("patched", "shared"),
        ("healed", "shared, healed"))


def plot_heal(report: Any, path_stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """One figure of a `heal.HealReport` (read through its fields; heal calls this, so no import back): for each
    held-out text, perplexity of the unshared and shared model before and after the same fine-tune (the control
    where it ran), with the gap healing closed; and the training loss per step."""
    names = list(report.evals)
    faithful = all("kl" in report.evals[name] for name in names)
    with paper_style():
        fig = new_figure(3.2 * len(names) + 4.2 + (2.8 if faithful else 0), 3.6)
        widths = [1] * len(names) + ([1] if faithful else []) + [1.3]
        axes = fig.subplots(1, len(widths), width_ratios=widths)
        for axis, name in zip(axes, names):
            _perplexity_bars(axis, report, name)
        if faithful:
            _faithfulness_bars(axes[len(names)], report, names)
        curve = axes[-1]
        steps = range(1, len(report.losses) + 1)
        curve.plot(steps, report.losses, color=PALETTE[6], linewidth=0.8, label="step loss")
        if len(report.losses) >= 5:
            k = max(2, len(report.losses) // 10)
            smooth = [sum(report.losses[max(0, i - k + 1):i + 1]) / len(report.losses[max(0, i - k + 1):i + 1]) for i in range(len(report.losses))]
            curve.plot(steps, smooth, color=PALETTE[0], linewidth=1.6, label=f"mean of {k}")
        from matplotlib.ticker import MaxNLocator

        curve.xaxis.set_major_locator(MaxNLocator(integer=True))
        curve.set_xlabel("optimizer step")
        curve.set_ylabel("training loss (nats)")
        kind = "response tokens" if report.data.get("kind") == "alpaca" else "all tokens"
        what = "KL to the untouched model" if report.objective == "distill" else f"LM loss on {kind}"
        curve.set_title(f"{report.config.get('method', '')} heal: {what}")
        curve.legend(frameon=False)
        return save_figure(fig, path_stem, formats)


def _perplexity_bars(axis: Any, report: Any, name: str) -> None:
    """Perplexity of unshared / control / shared / shared-healed on one held-out text, the gap closed in the title."""
    ppl = report.evals[name]["perplexity"]
    distilled = report.objective == "distill"  # its control is the untouched model: one bar
    shown = [(key, label) for key, label in BARS if key in ppl and not (distilled and key == "control")]
    values = [ppl[key] for key, _ in shown]
    colours = {"baseline": PALETTE[0], "control": PALETTE[1], "patched": PALETTE[3], "healed": PALETTE[2]}
    drawn = axis.bar([label for _, label in shown], values, color=[colours[key] for key, _ in shown])
    axis.bar_label(drawn, labels=[f"{v:.4g}" for v in values], padding=2, fontsize=8)
    axis.set_ylim(0, max(values) * 1.2)
    axis.tick_params(axis="x", labelsize=7)
    gaps = report.gaps(name)
    untouched = f"healed {100 * math.expm1(gaps['after_untouched']):+.1f}% vs untouched"
    closed = ("no control" if gaps["after"] is None or distilled else
              "sharing cost nothing" if gaps["closed"] is None else
              f"{100 * math.expm1(gaps['after']):+.1f}% vs control, {100 * gaps['closed']:.0f}% of the gap closed")
    closed = f"{untouched}; {closed}" if not distilled else untouched
    source = (report.evals[name].get("text") or {}).get("source", "")
    axis.set_title(f"{name}\n{source}\n{closed}", fontsize=8)
    axis.set_ylabel("perplexity (held-out)")


def _faithfulness_bars(axis: Any, report: Any, names: list[str]) -> None:
    """Next-token KL to the untouched model on each held-out text, before and after healing (and the control's, for
    an LM heal), with the top-1 agreement over each bar: how far the model moved from the one the user had."""
    import numpy as np

    states = [("patched", "shared", PALETTE[3]), ("healed", "shared, healed", PALETTE[2])]
    if report.objective != "distill" and all("control" in report.evals[n]["kl"] for n in names):
        states.append(("control", "control", PALETTE[1]))
    x = np.arange(len(names))
    width = 0.8 / len(states)
    for i, (key, label, colour) in enumerate(states):
        kl = [report.evals[n]["kl"][key] for n in names]
        top1 = [report.evals[n]["top1"][key] for n in names]
        drawn = axis.bar(x + (i - (len(states) - 1) / 2) * width, kl, width, color=colour, label=label)
        axis.bar_label(drawn, labels=[f"{t:.0%}" for t in top1], padding=2, fontsize=7)
    axis.set_xticks(x, [n.replace(", ", ",\n") for n in names], fontsize=7)
    axis.set_ylabel("KL(untouched || model), nats")
    axis.set_ylim(0, axis.get_ylim()[1] * 1.15)
    axis.set_title("faithfulness to the untouched model\n(top-1 agreement over each bar)", fontsize=8)
    axis.legend(frameon=False, fontsize=7)
