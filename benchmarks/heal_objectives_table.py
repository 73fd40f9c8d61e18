#!/usr/bin/env python
"""Issue 34's table and figure: the frontier healed by each objective, side by side, by the three yardsticks.

    PYTHONPATH=. python benchmarks/heal_objectives_table.py RESULTS --model smollm2 --out figures/heal_objectives.png

RESULTS holds one folder per run, `<model>-<objective><steps>/frontier.json` (as `benchmarks/heal_objectives_gpu.sh`
writes them). Prints, per budget, the held-out perplexity before healing and, per objective, the healed model against
the untouched one on both texts and its next-token KL to the untouched model; then per objective the largest budget
within the tolerance of the untouched model on both texts, and the faithful reach (that, and no further from the
untouched model in KL than the largest budget within the tolerance before healing was before healing; where no budget
is, the smallest budget measured stands in, and the table says so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis.search import Frontier  # noqa: E402

TEXTS = ("heal data, held out", "other text")
STYLE = {"lm": ("#d55e00", "o"), "distill": ("#0072b2", "s")}


def runs(folder: Path, model: str) -> dict[str, Frontier]:
    """{"lm100": Frontier, "distill1000": ...} of one model."""
    found = {}
    for path in sorted(folder.glob(f"{model}-*/frontier.json")):
        found[path.parent.name.removeprefix(f"{model}-")] = Frontier.load(path)
    return found


def kl_bound(frontier: Frontier) -> tuple[dict[str, float], str]:
    """The KL bound of the faithful reach, and where it comes from."""
    within = frontier.within()
    if within["kl_bound"]:
        return within["kl_bound"], f"the {within['before']}-layer plan before healing"
    first = min(frontier.points, key=lambda p: p.budget)
    return ({t: first.healed[t].kl_before for t in TEXTS},
            f"no budget is within the tolerance before healing: the {first.budget}-layer plan before healing stands in")


def reach(frontier: Frontier, bound: dict[str, float]) -> tuple[int | None, int | None]:
    """(largest budget within the tolerance of the untouched model on both texts, the faithful reach)."""
    tol = frontier.tolerance
    close = [p.budget for p in frontier.points if all(p.healed[t].change_untouched <= tol for t in TEXTS)]
    faithful = [b for b in close if all(next(p for p in frontier.points if p.budget == b).healed[t].kl_after <= bound[t]
                                         for t in TEXTS)]
    return (max(close) if close else None), (max(faithful) if faithful else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, default=None, help="figure (PNG)")
    args = parser.parse_args(argv)
    found = runs(args.results, args.model)
    reference = found.get("lm100") or next(iter(found.values()))
    bound, said = kl_bound(reference)
    names = sorted(found, key=lambda n: (int("".join(c for c in n if c.isdigit()) or 0), n))
    header = ["budget", "KV saved", "held-out before"] + [f"{n}: docs / code vs untouched, KL docs / code" for n in names]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    budgets = sorted({p.budget for f in found.values() for p in f.points})
    for budget in budgets:
        point = next((p for p in reference.points if p.budget == budget), None) or next(
            p for f in found.values() for p in f.points if p.budget == budget)
        base = reference.baseline["perplexity"]
        cells = [str(budget), f"{point.savings['kv_cache_fraction_saved']:.1%}", f"{100 * (point.heldout.perplexity / base - 1):+.1f} %"]
        for name in names:
            p = next((q for q in found[name].points if q.budget == budget), None)
            if p is None or not p.healed:
                cells.append("")
                continue
            h = [p.healed[t] for t in TEXTS]
            cells.append(f"{100 * h[0].change_untouched:+.1f} / {100 * h[1].change_untouched:+.1f} %, "
                         f"{h[0].kl_after:.3f} / {h[1].kl_after:.3f}")
        print("| " + " | ".join(cells) + " |")
    print(f"\nKL bound ({said}): " + ", ".join(f"{t} {v:.3f}" for t, v in bound.items()))
    for name in names:
        close, faithful = reach(found[name], bound)
        print(f"{name}: within {100 * found[name].tolerance:g} % of the untouched model on both texts up to "
              f"{close} layers; faithful reach {faithful} (of the budgets measured: "
              f"{', '.join(str(p.budget) for p in found[name].points)})")
    if args.out:
        figure(found, names, bound, args.out, args.model)
    return 0


def figure(found: dict[str, Frontier], names: list[str], bound: dict[str, float], out: Path, model: str) -> None:
    """Left: healed against the untouched model (perplexity change, both texts); right: next-token KL to the
    untouched model after healing, with the bound of the faithful reach; one line per objective and step count."""
    from sa_analysis.plots.style import new_figure, paper_style, save_figure

    with paper_style():
        fig = new_figure(7.6, 3.4)
        left, right = fig.subplots(1, 2)
        for name in names:
            frontier = found[name]
            objective = "distill" if name.startswith("distill") else "lm"
            colour, marker = STYLE[objective]
            long = "1000" in name
            for t, dash in zip(TEXTS, ("-", ":")):
                x = [p.budget for p in frontier.points]
                y = [100 * p.healed[t].change_untouched for p in frontier.points]
                kl = [p.healed[t].kl_after for p in frontier.points]
                label = f"{name} ({'docs' if t == TEXTS[0] else 'code'})"
                kw = dict(color=colour, marker=marker, linestyle=dash, markersize=3 if not long else 6,
                          markerfacecolor="none" if long else colour, linewidth=1.2, label=label)
                left.plot(x, y, **kw)
                right.plot(x, kl, **kw)
        tolerance = 100 * next(iter(found.values())).tolerance
        left.axhspan(-tolerance, tolerance, color="0.9", zorder=0)
        left.axhline(0, color="0.4", linewidth=0.6)
        left.set_xlabel("layers shared")
        left.set_ylabel("healed vs untouched model (perplexity, %)")
        left.set_yscale("symlog", linthresh=10)
        low, high = left.get_ylim()
        left.set_ylim(low * 1.5, high * 1.5)
        left.set_title(f"{model}: against the model you had\n(grey: within ±{tolerance:g} %)", fontsize=9)
        for t, dash in zip(TEXTS, ("-", ":")):
            right.axhline(bound[t], color="0.3", linestyle=dash, linewidth=0.8)
        right.set_yscale("log")
        right.set_xlabel("layers shared")
        right.set_ylabel("next-token KL to the untouched model (nats)")
        right.set_title("faithfulness after healing\n(grey: the faithful reach's bound)", fontsize=9)
        right.legend(frameon=False, fontsize=6, loc="best", ncol=2)
        save_figure(fig, out.with_suffix(""), ("png",))


if __name__ == "__main__":
    raise SystemExit(main())
