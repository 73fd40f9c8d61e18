"""The sharing frontier against the baselines a researcher tries first, before and after healing.

At each budget: the recommended plan (`sa-analyze frontier`, measured output damage), the last k layers, the best
contiguous k-span (every one measured on the calibration tokens, the least damaging kept) and SLEB-style greedy
selection (each step re-measures every remaining layer with the plan so far); all by the same calibration tokens,
all judged on the same held-out tokens. With --heal-steps each plan is healed (LoRA, the same recipe and seed) and
judged against the control (the unshared model healed the same way, one for all plans).

    PYTHONPATH=. python benchmarks/frontier_baselines.py --budgets 3,8,15 --heal-steps 100 --out DIR

Prints a table and writes DIR/frontier_baselines.json and DIR/frontier_baselines.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis import defaults  # noqa: E402
from sa_analysis.heal import HealConfig, heal, load_heal_data, run_control  # noqa: E402
from sa_analysis.io import json_safe  # noqa: E402
from sa_analysis.pipeline import ModelSpec, TextSpec, run_frontier  # noqa: E402
from sa_analysis.pipeline.heal import heal_evals  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402
from sa_analysis.plots import plot_frontier  # noqa: E402
from sa_analysis.damage.baselines import best_contiguous_plan, greedy_plans, last_layers_plan  # noqa: E402
from sa_analysis.damage.prefix import PrefixRun  # noqa: E402
from sa_analysis.stats import paired_interval, ppl_change  # noqa: E402
from sa_analysis.validate.frontier import summary_with_perplexity  # noqa: E402

METHODS = ("recommended", "last k layers", "best contiguous span", "greedy (SLEB)")


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

    frontier_started = time.perf_counter()
    result = run_frontier(spec, TextSpec(None, defaults.N_SEQS, None), budgets=args.budgets, heal_config=config,
                          out=args.out / "frontier", progress=say, resume=args.resume)
    frontier = result.frontier
    frontier_seconds = time.perf_counter() - frontier_started
    budgets = [p.budget for p in frontier.points]
    say(f"frontier done in {frontier_seconds:.0f} s")

    loaded = spec.load()
    seq_len = frontier.heldout["seq_len"]
    run = PrefixRun.record(loaded.model, TextSpec(seq_len=seq_len).damage_batch(loaded))
    held_batch = TextSpec(None, defaults.N_SEQS, seq_len).batch(loaded, "heldout")
    assert held_batch.describe()["token_sha1"] == frontier.heldout["token_sha1"], "not the frontier's held-out tokens"
    held = PrefixRun.record(loaded.model, held_batch)
    assert math.isclose(math.exp(held.baseline_nll), frontier.baseline["perplexity"], rel_tol=1e-4)
    n_layers, shape = loaded.info.n_layers, loaded.info.shape()
    plans: dict[tuple[int, str], SharePlan] = {}
    seconds: dict[str, float] = {"frontier (recommended plans; with --heal-steps their heals and the control)": frontier_seconds}
    for point in frontier.points:
        plans[(point.budget, "recommended")] = SharePlan.from_dict(point.plan)
        plans[(point.budget, "last k layers")] = last_layers_plan(n_layers, point.budget, shape)
    t = time.perf_counter()
    for k in budgets:
        plans[(k, "best contiguous span")] = best_contiguous_plan(run, k, model=shape)[0]
    seconds["best contiguous span (all budgets)"] = time.perf_counter() - t
    if not args.no_greedy:
        t = time.perf_counter()
        greedy = greedy_plans(run, max(budgets), model=shape, progress=say)
        seconds["greedy (SLEB), nested up to the largest budget"] = time.perf_counter() - t
        for k in budgets:
            plans[(k, "greedy (SLEB)")] = greedy[k][0]
    rows = judge(plans, run, held, frontier.baseline["perplexity"])
    if config is not None:
        heal_all(spec, loaded, frontier, plans, rows, config, say)
    report = {"model": loaded.info.to_dict(), "budgets": budgets, "baseline": frontier.baseline, "rows": rows,
              "seconds": {**seconds, "total": time.perf_counter() - started}, "frontier": frontier.to_dict(),
              "heal": frontier.heal}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier_baselines.json").write_text(json.dumps(json_safe(report), indent=1))
    print_table(rows, frontier.baseline["perplexity"], seconds)
    plot_frontier(frontier, args.out / "frontier_baselines", baselines=series(rows, frontier))
    say(f"wrote {args.out / 'frontier_baselines.json'} and .png")


def judge(plans: dict[tuple[int, str], SharePlan], run: PrefixRun, held: PrefixRun, baseline: float) -> list[dict]:
    """Each plan on the held-out tokens, and its difference from the recommended plan of its budget: the held-out
    NLL change, paired over the same sequences, as a perplexity ratio with its 95 % interval (negative: the baseline
    has the lower perplexity). The calibration KL and NLL change say what each method saw when it chose."""
    rows, recommended = [], {}
    for (k, method), plan in sorted(plans.items(), key=lambda item: (item[0][0], METHODS.index(item[0][1]))):
        damage = held.damage(plan.anchor_of, plan.head_map)
        measured, per_sequence = summary_with_perplexity(held, damage), damage.nll_change  # [S] NLL change, nats
        if method == "recommended":
            recommended[k] = per_sequence
        mean, low, high = paired_interval(per_sequence, recommended[k])
        calibration = run.damage(plan.anchor_of, plan.head_map)
        rows.append({"budget": k, "method": method, "followers": plan.followers, "aligned": plan.aligned_followers,
                     "heldout_perplexity": measured["perplexity"], "heldout_change": measured["perplexity"] / baseline - 1,
                     "heldout_kl": measured["kl"], "vs_recommended": [ppl_change(v) for v in (mean, low, high)],
                     "calibration_kl": calibration.kl_mean, "calibration_nll_change": calibration.nll_mean})
    return rows


def replot(out: Path) -> None:
    """Print the table and redraw the figure of a finished run from its JSON."""
    from sa_analysis.validate import Frontier

    saved = json.loads((out / "frontier_baselines.json").read_text())
    frontier = Frontier.from_dict(saved["frontier"])
    print_table(saved["rows"], saved["baseline"]["perplexity"], saved["seconds"])
    print(plot_frontier(frontier, out / "frontier_baselines", baselines=series(saved["rows"], frontier)))


def heal_all(spec, loaded, frontier, plans, rows, config, say) -> None:
    """Heal every baseline plan the same way as the recommended ones (whose heals the frontier made), judged against
    the same (cached) control; identical plans are healed once."""
    train = load_heal_data(None, loaded.tokenizer, seq_len=config.seq_len,
                           max_examples=config.steps * config.batch_size * config.grad_accum)
    evals = heal_evals(loaded, None, TextSpec(None, defaults.HEAL_N_SEQS, config.seq_len))
    control = run_control(loaded, train, evals, config)
    say(f"control: {control['status']}")
    by_budget = {p.budget: p for p in frontier.points}
    done: dict[tuple, dict] = {}
    for row in rows:
        plan = plans[(row["budget"], row["method"])]
        key = (tuple(plan.followers), tuple(plan.aligned_followers))
        if row["method"] == "recommended":
            done[key] = by_budget[row["budget"]].healed
        if key not in done:
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
