"""The heal figure: held-out perplexity of baseline, patched and healed, and the training loss per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .style import PALETTE, new_figure, paper_style, save_figure


def plot_heal(report: Any, path_stem: str | Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """One figure of a `heal.HealReport` (read through its fields; heal calls this, so no import back): held-out
    perplexity bars (baseline / patched / healed) and the training loss per step."""
    with paper_style():
        fig = new_figure(9.0, 3.4)
        bars, curve = fig.subplots(1, 2, width_ratios=[1, 1.6])
        names = ["baseline", "patched", "healed"]
        values = [report.perplexity[n] for n in names]
        drawn = bars.bar(names, values, color=[PALETTE[0], PALETTE[3], PALETTE[2]])
        labels = [f"{values[0]:.4g}"] + [f"{v:.4g}\n({100 * (v / values[0] - 1):+.1f}%)" for v in values[1:]]
        bars.bar_label(drawn, labels=labels, padding=2, fontsize=8)
        bars.axhline(values[0], color=PALETTE[0], linewidth=0.8, linestyle="--", alpha=0.6, zorder=0)
        bars.set_ylabel("perplexity (held-out)")
        bars.set_ylim(0, max(values) * 1.22)
        rec = "" if report.recovered is None else f", recovered {100 * report.recovered:.0f}%"
        bars.set_title(f"{report.plan.get('n_shared', len(report.plan.get('followers', [])))} layers shared{rec}")
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
