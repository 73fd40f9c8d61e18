"""Calibration of the damage predictor: predicted vs measured held-out perplexity, and the plans it recommends.

For one model:
1. A report on 8 x 256 calibration tokens (the attention similarity the old planner priced), and measured damage on
   the calibration tokens `recommend-spans` uses (`damage.measure`: each follower alone with each anchor it needs).
2. Every contiguous 3-layer span, by head index and head-aligned, and a sample of non-contiguous 3-layer plans (each
   follower the better of its two ways, as `--align-heads auto` measures it): the predicted damage of the span model
   the planner optimises (`damage.table.predict`: each span of two or more followers measured whole, single
   followers alone, summed; for a contiguous 3-span that is its own measurement on calibration tokens), the sum of
   the followers alone (the additive model), the summed attention KL, the whole plan's damage on calibration
   tokens, and the measured perplexity and next-token KL on held-out text (`measure_quality`, 8 x 256 tokens, in two
   halves: how well the halves rank the plans alike is the held-out side's own noise, the ceiling any predictor
   can reach). Spearman rank correlations.
3. The plan `recommend-spans --budget 3` recommends with its defaults, and the one `--validate --tolerance 1.0`
   chooses, each on held-out text next to the best contiguous head-aligned 3-span, with the time each took.
4. A figure of predicted vs measured (`--figure`).

    PYTHONPATH=. python benchmarks/damage_calibration.py --out benchmarks/results/damage.json --figure figures/damage_calibration.png
    PYTHONPATH=. python benchmarks/damage_calibration.py --model qwen.gguf --device cuda --out qwen.json

CPU (2 cores), default model: about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from scipy.stats import spearmanr

from sa_analysis import defaults
from sa_analysis.data import token_batch
from sa_analysis.loading import load_model
from sa_analysis.pipeline import TextSpec, analyse
from sa_analysis.planner import anchors_for, price_pairs
from sa_analysis.damage.logprobs import token_ids
from sa_analysis.damage.measure import Meter, measure_pairs, measure_spans, plan_from_damage
from sa_analysis.damage.prefix import PrefixRun
from sa_analysis.damage.table import DamageTable, plan_spans_ways, predict
from sa_analysis.search import search_plans
from sa_analysis.validate import measure_quality, untouched


def span_plans(n_layers: int, length: int = 3) -> list[list[int]]:
    return [list(range(f, f + length)) for f in range(1, n_layers - length + 1)]


def sample_plans(n_layers: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` distinct non-contiguous 3-follower plans, uniformly among all of them."""
    rng = random.Random(seed)
    plans: set[tuple[int, ...]] = set()
    while len(plans) < count:
        followers = tuple(sorted(rng.sample(range(1, n_layers), 3)))
        if followers[2] - followers[0] > 2:  # not one contiguous span
            plans.add(followers)
    return [list(p) for p in sorted(plans)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=defaults.MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=30, help="non-contiguous plans measured")
    parser.add_argument("--heldout-seqs", type=int, default=8, help="held-out sequences of 256 tokens")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--figure", type=Path)
    parser.add_argument("--redraw", action="store_true", help="only redraw --figure (and the tables) from --out")
    parser.add_argument("--plans-only", action="store_true",
                        help="only the recommended plan against every contiguous head-aligned 3-span, on held-out text "
                             "(no correlation, no search: for a model too slow for the whole run)")
    args = parser.parse_args()
    if args.redraw:
        result = json.loads(args.out.read_text())
        print_tables(result)
        draw(result, args.figure)
        return
    started = time.time()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, n_layers = loaded.model, loaded.info.n_layers
    report = analyse(loaded, token_batch(loaded.tokenizer, split="calibration", n_seqs=8, seq_len=256,
                                          max_positions=loaded.info.max_positions))
    heldout_ids = token_ids(heldout_batch(loaded, args.heldout_seqs))  # [S, T]
    heldout = untouched(model, heldout_ids)
    half = args.heldout_seqs // 2
    halves = [untouched(model, heldout_ids[:half]), untouched(model, heldout_ids[half:])]
    calibration = TextSpec(seq_len=256).damage_batch(loaded)

    timing = {}
    clock = time.time()
    recommended = plan_from_damage(loaded, report, calibration, budget=3, progress=print).plan
    timing["recommend_damage_s"] = time.time() - clock
    if args.plans_only:
        plans_only(args, loaded, report, heldout, recommended, timing, started)
        return
    run = PrefixRun.record(model, calibration)
    table = DamageTable(n_layers, run.n_seqs, run.n_tokens, run.baseline_nll)
    similarity = price_pairs(report, "kl", "on")
    maps = {(m, a): [int(g) for g in similarity.alignment.maps[m, a]] for m in range(1, n_layers) for a in range(m)}
    spans, samples = span_plans(n_layers), sample_plans(n_layers, args.samples)
    needed = sorted({(m, a) for followers in spans + samples for m, a in anchors_for(followers, n_layers).items()})
    meter = Meter(lambda m: print(m, flush=True))
    measure_pairs(run, table, needed, maps, meter, "on")

    rows = []
    for kind, plans in (("contiguous", spans), ("sample", samples)):
        for followers in plans:
            anchor_of = anchors_for(followers, n_layers)
            ways = ("index", "aligned") if kind == "contiguous" else ("auto",)
            for way in ways:
                chosen = {m: (way if way != "auto" else table.way_for(m, a, "auto")) for m, a in anchor_of.items()}
                heads = {m: maps[(m, a)] for m, a in anchor_of.items() if chosen[m] == "aligned"}
                parts = plan_spans_ways(followers, heads, n_layers)
                measure_spans(run, table, [(a, w) for a, w in parts if len(w) > 1 and (a, w) not in table.spans], meter)
                predicted = predict(table, followers, heads)
                attention = sum(float((similarity.alignment.aligned if chosen[m] == "aligned" else similarity.by_index)[m, a])
                                for m, a in anchor_of.items())
                # one span: the span model's prediction is its whole measurement (the same forward), else measure whole
                whole = predicted if len(parts) == 1 else run.damage(anchor_of, heads).summary()
                held = [measure_quality(model, anchor_of, h, head_map=heads) for h in halves]
                rows.append({"kind": kind, "way": way, "followers": followers, "predicted_kl": predicted.kl,
                             "sum_kl": float(sum(predicted.followers[m].kl for m in followers)),
                             "attention_kl": attention, "whole_kl": whole.kl, "whole_nll": whole.nll_change,
                             "heldout_ppl": _pooled(held, "nll_patched", math.exp), "heldout_kl": _pooled(held, "kl_mean"),
                             "heldout_ppl_halves": [h["ppl_patched"] for h in held]})
                print(f"{kind} {way} {followers}: predicted {predicted.kl:.4f}, held-out ppl {rows[-1]['heldout_ppl']:.3f}",
                      flush=True)

    def rank(group: list[dict], key: str) -> float:
        return float(spearmanr([r[key] for r in group], [r["heldout_ppl"] for r in group]).statistic)

    correlations = {}
    for name, group in (("contiguous, index", [r for r in rows if r["kind"] == "contiguous" and r["way"] == "index"]),
                        ("contiguous, aligned", [r for r in rows if r["kind"] == "contiguous" and r["way"] == "aligned"]),
                        ("non-contiguous sample", [r for r in rows if r["kind"] == "sample"])):
        correlations[name] = {key: rank(group, key) for key in ("predicted_kl", "sum_kl", "whole_kl", "whole_nll", "attention_kl")}
        correlations[name]["predicted_vs_heldout_kl"] = float(spearmanr([r["predicted_kl"] for r in group],
                                                                        [r["heldout_kl"] for r in group]).statistic)
        correlations[name]["ceiling"] = noise_ceiling(group)

    def heldout_ppl(plan) -> float:
        return measure_quality(model, plan.anchor_of, heldout, head_map=plan.head_map)["ppl_patched"]

    clock = time.time()
    search = search_plans(loaded, report, calibration, heldout_batch(loaded, args.heldout_seqs), budgets=[1, 2, 3],
                          tolerance=1.0)
    timing["validate_search_s"] = time.time() - clock
    best_span = min((r for r in rows if r["kind"] == "contiguous" and r["way"] == "aligned"), key=lambda r: r["heldout_ppl"])
    plans = {"recommended (defaults)": (recommended.followers, recommended.aligned_followers, heldout_ppl(recommended)),
             "validated (--tolerance 1.0)": (search.best_plan.followers, search.best_plan.aligned_followers,
                                             heldout_ppl(search.best_plan)),
             "best contiguous span, head-aligned": (best_span["followers"], best_span["followers"], best_span["heldout_ppl"])}
    result = {"model": loaded.info.name, "device": args.device, "dtype": args.dtype, "heldout_tokens": heldout.input_ids.numel(),
              "baseline_ppl": math.exp(
        measure_quality(model, {}, heldout)["nll_baseline"]), "calibration_tokens": run.n_tokens,
        "correlations": correlations, "plans": {k: {"followers": f, "aligned": a, "heldout_ppl": p} for k, (f, a, p) in plans.items()},
        "timing": timing, "rows": rows, "seconds": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_tables(result)
    if args.figure:
        draw(result, args.figure)


def plans_only(args, loaded, report, heldout, recommended, timing: dict, started: float) -> None:
    """The recommended plan and every contiguous head-aligned 3-span (Hungarian maps), measured on held-out text."""
    model, n_layers = loaded.model, loaded.info.n_layers
    maps = price_pairs(report, "kl", "on").alignment.maps
    spans = []
    for followers in span_plans(n_layers):
        anchor_of = anchors_for(followers, n_layers)
        heads = {m: [int(g) for g in maps[m, a]] for m, a in anchor_of.items()}
        ppl = measure_quality(model, anchor_of, heldout, head_map=heads)["ppl_patched"]
        spans.append({"followers": followers, "heldout_ppl": ppl})
        print(f"span {followers} aligned: held-out ppl {ppl:.3f}", flush=True)
    best = min(spans, key=lambda r: r["heldout_ppl"])
    got = measure_quality(model, recommended.anchor_of, heldout, head_map=recommended.head_map)["ppl_patched"]
    result = {"model": loaded.info.name, "device": args.device, "dtype": args.dtype, "plans_only": True,
              "heldout_tokens": heldout.input_ids.numel(),
              "baseline_ppl": math.exp(measure_quality(model, {}, heldout)["nll_baseline"]),
              "calibration_tokens": recommended.damage.n_tokens, "recommended_damage": recommended.damage.to_dict(),
              "plans": {"recommended (defaults)": {"followers": recommended.followers, "aligned": recommended.aligned_followers,
                                                   "heldout_ppl": got},
                        "best contiguous span, head-aligned": {"followers": best["followers"], "aligned": best["followers"],
                                                               "heldout_ppl": best["heldout_ppl"]}},
              "spans": spans, "correlations": {}, "timing": timing, "seconds": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_tables(result)


def _pooled(halves: list[dict], key: str, then=lambda v: v) -> float:
    """A per-token mean over both held-out halves (weighted by their token counts), then `then`."""
    n = sum(h["n_tokens"] for h in halves)
    return then(sum(h[key] * h["n_tokens"] for h in halves) / n)


def noise_ceiling(group: list[dict]) -> float:
    """How well any predictor can rank the held-out perplexity: the rank correlation of the two held-out halves
    (split-half reliability r), stepped up to the whole held-out set (Spearman-Brown 2r / (1 + r)), its square root
    (the expected correlation of the measurement with a noise-free version of itself)."""
    r = float(spearmanr([row["heldout_ppl_halves"][0] for row in group], [row["heldout_ppl_halves"][1] for row in group]).statistic)
    return math.sqrt(max(0.0, 2 * r / (1 + r))) if r > -1 else 0.0


def heldout_batch(loaded, n_seqs: int):
    return token_batch(loaded.tokenizer, split="heldout", n_seqs=n_seqs, seq_len=256, max_positions=loaded.info.max_positions)


def print_tables(result: dict) -> None:
    print(f"\n{result['model']}: baseline held-out perplexity {result['baseline_ppl']:.3f}")
    print("Spearman rank correlation with held-out perplexity (last columns: the span model against held-out KL, and "
          "the held-out side's noise ceiling)")
    print("| plans | predicted (span model) | sum of followers alone | whole plan on calibration (KL) | whole plan (NLL change) "
          "| summed attention KL | predicted vs held-out KL | noise ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in result["correlations"].items():
        print(f"| {name} | {v['predicted_kl']:.3f} | {v['sum_kl']:.3f} | {v['whole_kl']:.3f} | {v['whole_nll']:.3f} "
              f"| {v['attention_kl']:.3f} | {v['predicted_vs_heldout_kl']:.3f} | {v['ceiling']:.3f} |")
    best = result["plans"]["best contiguous span, head-aligned"]["heldout_ppl"]
    print("\n| plan | followers | head-aligned | held-out perplexity | vs best contiguous aligned span |")
    print("|---|---|---|---|---|")
    for name, plan in result["plans"].items():
        print(f"| {name} | {plan['followers']} | {plan['aligned']} | {plan['heldout_ppl']:.3f} | "
              f"{100 * (plan['heldout_ppl'] / best - 1):+.1f}% |")
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in result["timing"].items()))


def draw(result: dict, path: Path) -> None:
    """Predicted damage vs measured held-out perplexity: contiguous spans (index and aligned) and the sample."""
    from matplotlib.ticker import FuncFormatter

    from sa_analysis.plots.style import PALETTE, new_figure, paper_style, save_figure

    with paper_style():
        fig = new_figure(10.5, 4.2)
        axes = fig.subplots(1, 2)
        for ax, key, label in ((axes[0], "predicted_kl", "predicted: next-token KL of its spans measured on calibration text, summed (nats)"),
                               (axes[1], "attention_kl", "old prior: summed head-mean attention KL (nats)")):
            for (kind, way), style in {("contiguous", "index"): dict(color=PALETTE[0], marker="o"),
                                       ("contiguous", "aligned"): dict(color=PALETTE[1], marker="s"),
                                       ("sample", "auto"): dict(color=PALETTE[2], marker="^")}.items():
                group = [r for r in result["rows"] if r["kind"] == kind and r["way"] == way]
                rho = spearmanr([r[key] for r in group], [r["heldout_ppl"] for r in group]).statistic
                ax.scatter([r[key] for r in group], [r["heldout_ppl"] for r in group], s=22, alpha=0.8,
                           label=f"{'3-spans' if kind == 'contiguous' else 'other 3-layer plans'}, "
                                 f"{'by index' if way == 'index' else 'head-aligned' if way == 'aligned' else 'best way'} "
                                 f"(Spearman {rho:.2f})", **style)
            ax.axhline(result["baseline_ppl"], color="0.5", linestyle=":", linewidth=1, label="unshared model")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
            ax.set_xlabel(label)
            ax.set_ylabel("held-out perplexity (measured)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="upper left", frameon=False)
        axes[0].set_title("Measured output damage ranks plans")
        axes[1].set_title("Attention similarity ranks them poorly")
        fig.suptitle(f"{result['model']}: 3 shared layers, predicted on {result['calibration_tokens']} calibration tokens, "
                     f"measured on {result.get('heldout_tokens', 2048)} held-out tokens", fontsize=10)
        save_figure(fig, path, ("png",))


if __name__ == "__main__":
    main()
