"""The heal figure: held-out perplexity of baseline, patched and healed, and the training loss per step."""

from __future__ import annotations

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
    with paper_style():
        fig = new_figure(3.2 * len(names) + 4.2, 3.6)
        axes = fig.subplots(1, len(names) + 1, width_ratios=[1] * len(names) + [1.3])
        for axis, name in zip(axes, names):
            _perplexity_bars(axis, report, name)
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
        curve.set_title(f"{report.config.get('method', '')} heal, loss on {kind}")
        curve.legend(frameon=False)
        return save_figure(fig, path_stem, formats)


def _perplexity_bars(axis: Any, report: Any, name: str) -> None:
    """Perplexity of unshared / control / shared / shared-healed on one held-out text, the gap closed in the title."""
    ppl = report.evals[name]["perplexity"]
    shown = [(key, label) for key, label in BARS if key in ppl]
    values = [ppl[key] for key, _ in shown]
    colours = {"baseline": PALETTE[0], "control": PALETTE[1], "patched": PALETTE[3], "healed": PALETTE[2]}
    drawn = axis.bar([label for _, label in shown], values, color=[colours[key] for key, _ in shown])
    axis.bar_label(drawn, labels=[f"{v:.4g}" for v in values], padding=2, fontsize=8)
    axis.set_ylim(0, max(values) * 1.2)
    axis.tick_params(axis="x", labelsize=7)
    gaps = report.gaps(name)
    closed = ("recovery not measured (no control)" if gaps["after"] is None else
              "sharing cost nothing" if gaps["closed"] is None else f"healing closed {100 * gaps['closed']:.0f}% of the gap")
    source = (report.evals[name].get("text") or {}).get("source", "")
    axis.set_title(f"{name}\n{source}\n{closed}", fontsize=8)
    axis.set_ylabel("perplexity (held-out)")
