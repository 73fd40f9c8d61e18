"""The sharing frontier against the baselines a researcher tries first, before and after healing.

At each budget: the recommended plan (`sa-analyze frontier`, measured output damage), the last k layers, the best
contiguous k-span (every one measured on the calibration tokens, the least damaging kept) and SLEB-style greedy
selection (each step re-measures every remaining layer with the plan so far); all by the same calibration tokens,
all judged on the same held-out tokens: `frontier --baselines` (`run_frontier(baselines=...)`). With --heal-steps
each plan is healed (LoRA, the same recipe and seed) and judged against the control (the unshared model healed the
same way, one for all plans): the frontier heals its plans, this script heals the baselines' the same way.

    PYTHONPATH=. python benchmarks/frontier_baselines.py --budgets 3,8,15 --heal-steps 100 --out DIR

Prints a table and writes DIR/frontier_baselines.json and DIR/frontier_baselines.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis import defaults  # noqa: E402
from sa_analysis.choices import BASELINES, GREEDY  # noqa: E402
from sa_analysis.heal import HealConfig, heal, load_heal_data, run_control  # noqa: E402
from sa_analysis.io import json_safe  # noqa: E402
from sa_analysis.pipeline import ModelSpec, TextSpec, run_frontier  # noqa: E402
from sa_analysis.pipeline.heal import heal_evals  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402
from sa_analysis.plots import plot_frontier  # noqa: E402
from sa_analysis.prechecks import parse_budgets  # noqa: E402
from sa_analysis.stats import ppl_change  # noqa: E402

METHODS = ("recommended", *BASELINES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=defaults.MODEL)
    parser.add_argument("--budgets", default="3,8,15")
    parser.add_argument("--heal-steps", type=int, default=0)
    parser.add_argument("--heal-seed", type=int, default=0, help="the seed of every heal and of the control")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--no-greedy", action="store_true", help="leave greedy selection out (its cost grows as L x k)")
    parser.add_argument("--damage-tokens", type=int, default=defaults.DAMAGE_TOKENS,
                        help="calibration tokens every method chooses its plans on (the tool's default unless given)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--replot", action="store_true", help="redraw OUT/frontier_baselines.png from its JSON")
    parser.add_argument("--resume", action="store_true", help="go on from the frontier's saved measurements under OUT")
    args = parser.parse_args()
    if args.replot:
        return replot(args.out)
    defaults.DAMAGE_TOKENS = args.damage_tokens  # read by TextSpec.damage_batch: the frontier and the baselines alike
    started = time.perf_counter()
    spec = ModelSpec(args.model, args.device, args.dtype)
    config = (HealConfig(method="lora", steps=args.heal_steps, seq_len=defaults.SEQ_LEN, seed=args.heal_seed)
              if args.heal_steps else None)
    say = lambda message: print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)  # noqa: E731
    methods = tuple(m for m in BASELINES if not (args.no_greedy and m == GREEDY))
    result = run_frontier(spec, TextSpec(None, defaults.N_SEQS, None), budgets=parse_budgets(args.budgets),
                          baselines=methods, heal_config=config, out=args.out / "frontier", progress=say,
                          resume=args.resume)
    frontier = result.frontier
    say(f"frontier and baselines done in {time.perf_counter() - started:.0f} s")
    rows = table_rows(frontier)
    if config is not None:
        heal_all(spec, frontier, rows, config, say)
    report = {"model": frontier.model, "budgets": [p.budget for p in frontier.points], "baseline": frontier.baseline,
              "rows": rows, "seconds": {"total": time.perf_counter() - started}, "frontier": frontier.to_dict(),
              "heal": frontier.heal}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier_baselines.json").write_text(json.dumps(json_safe(report), indent=1))
    print_table(rows, frontier.baseline["perplexity"], report["seconds"])
    plot_frontier(frontier, args.out / "frontier_baselines", baselines=series(rows, frontier))
    say(f"wrote {args.out / 'frontier_baselines.json'} and .png")


def table_rows(frontier) -> list[dict]:
    """One row per budget and method from the frontier's points and their baselines (all on the same held-out
    tokens; `vs_recommended`: the paired held-out perplexity ratio - 1 against the recommended plan)."""
    base, rows = frontier.baseline["perplexity"], []
    for point in frontier.points:
        aligned = [int(m) for m in (point.plan.get("head_map") or {})]
        rows.append({"budget": point.budget, "method": "recommended", "followers": point.plan["followers"],
                     "aligned": aligned, "heldout_perplexity": point.heldout.perplexity,
                     "heldout_change": point.heldout.perplexity / base - 1, "heldout_kl": point.heldout.kl,
                     "vs_recommended": [0.0, 0.0, 0.0], "calibration_kl": point.predicted.kl,
                     "calibration_nll_change": point.predicted.nll_change,
                     "healed": {text: {"change": h.change} for text, h in (point.healed or {}).items()}})
        for method, row in (point.baselines or {}).items():
            rows.append({"budget": point.budget, "method": method, "followers": row.followers,
                         "aligned": row.aligned, "heldout_perplexity": row.heldout.perplexity,
                         "heldout_change": row.heldout.perplexity / base - 1, "heldout_kl": row.heldout.kl,
                         "vs_recommended": row.vs_recommended, "calibration_kl": row.calibration.kl,
                         "calibration_nll_change": row.calibration.nll_change})
    return rows


def replot(out: Path) -> None:
    """Print the table and redraw the figure of a finished run from its JSON."""
    from sa_analysis.search import Frontier

    saved = json.loads((out / "frontier_baselines.json").read_text())
    frontier = Frontier.from_dict(saved["frontier"])
    print_table(saved["rows"], saved["baseline"]["perplexity"], saved["seconds"])
    print(plot_frontier(frontier, out / "frontier_baselines", baselines=series(saved["rows"], frontier)))


def heal_all(spec, frontier, rows, config, say) -> None:
    """Heal every baseline plan the same way as the recommended ones (whose heals the frontier made), judged against
    the same (cached) control; identical plans are healed once."""
    loaded = spec.load()
    train = load_heal_data(None, loaded.tokenizer, seq_len=config.seq_len,
                           max_examples=config.steps * config.batch_size * config.grad_accum)
    evals = heal_evals(loaded, None, TextSpec(None, defaults.HEAL_N_SEQS, config.seq_len))
    control = run_control(loaded, train, evals, config)
    say(f"control: {control['status']}")
    done: dict[tuple, dict] = {}
    for row in rows:
        key = (tuple(row["followers"]), tuple(row["aligned"]))
        if row["method"] == "recommended":
            done[key] = row["healed"]
    for row in rows:
        key = (tuple(row["followers"]), tuple(row["aligned"]))
        if key not in done:
            plan = SharePlan(n_layers=frontier.model["n_layers"], followers=row["followers"])
            say(f"healing {row['method']} at {row['budget']}: {plan.spans_spec()}")
            report = heal(spec.load(), plan, train, evals, config, export=False, control=control)
            done[key] = {name: {**e["perplexity"], "change": e["perplexity"]["healed"] / e["perplexity"]["control"] - 1}
                         for name, e in report.evals.items()}
        row["healed"] = done[key]


def series(rows, frontier) -> dict:
    """The baselines as the frontier figure draws them: KV cache saved, % change before and after healing."""
    saved = {p.budget: 100 * p.savings["kv_cache_fraction_saved"] for p in frontier.points}
    out: dict[str, dict] = {}
    for row in rows:
        if row["method"] == "recommended":
            continue
        entry = out.setdefault(row["method"], {"saved": [], "before": [], "after": {}})
        entry["saved"].append(saved[row["budget"]])
        entry["before"].append(100 * row["heldout_change"])
        for text, values in (row.get("healed") or {}).items():
            entry["after"].setdefault(text, []).append(100 * values["change"])
    return out


def print_table(rows, baseline: float, seconds: dict) -> None:
    texts = list(rows[0].get("healed") or {})
    header = (["budget", "method", "followers", "held-out ppl", "vs unshared", "vs recommended [95 %]", "calibration KL",
               "calibration NLL"] + [f"healed vs control ({t})" for t in texts])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        followers = ", ".join(f"{m}{'ᵃ' if m in row['aligned'] else ''}" for m in row["followers"])
        versus = row.get("vs_recommended")
        versus = "" if versus is None or row["method"] == "recommended" else "{:+.1f}% [{:+.1f}, {:+.1f}]".format(
            *(100 * v for v in versus))
        nll = row.get("calibration_nll_change")
        cells = [str(row["budget"]), row["method"], followers, f"{row['heldout_perplexity']:.2f}",
                 f"{100 * row['heldout_change']:+.1f}%", versus, f"{row['calibration_kl']:.3f}",
                 "" if nll is None else f"{100 * ppl_change(nll):+.1f}%"]
        cells += [f"{100 * row['healed'][t]['change']:+.1f}%" for t in texts]
        print("| " + " | ".join(cells) + " |")
    print(f"unshared held-out perplexity {baseline:.3f}; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
