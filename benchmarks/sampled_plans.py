#!/usr/bin/env python
"""Plans from sampled rows against plans from all rows, on one model and text, printed as a table.

For each length the whole heatmap job (`pipeline.analyse`, streaming path) runs twice on the same tokens: over every
query row, and over a stratified sample of them (`--fraction` of the rows, 16 replicates). Then:
- how far each sampled estimate of the layer x layer matrices (KL, flat cosine) lies from the exact value, in units
  of its own standard error (a calibrated error puts ~95 % within 2);
- the planner (`plan_spans`, KL cost, head maps on auto) on both reports at each budget: the same followers, anchors
  and head maps or not (how many query heads are mapped to another anchor head), and what the sampled plan costs
  when priced on the exact report (its regret).

    python benchmarks/sampled_plans.py --lengths 2048                       # CPU, the default model
    python benchmarks/sampled_plans.py --model smol.gguf --device cuda --lengths 8192 32768
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import torch


def within_standard_errors(exact, sampled, name: str) -> dict:
    """Share of the off-diagonal finite cells within 2 standard errors, and the median |z|."""
    a, b, se = exact.layer_matrix(name), sampled.layer_matrix(name), sampled.layer_matrix_se(name)
    cells = ~np.eye(a.shape[0], dtype=bool) & np.isfinite(a) & (se > 0)
    z = (b[cells] - a[cells]) / se[cells]
    return dict(within_2se=float((np.abs(z) < 2).mean()), abs_z_median=float(np.median(np.abs(z))),
                se_median=float(np.median(se[cells])), value_median=float(np.median(np.abs(a[cells]))))


def compare_plans(exact, sampled, budget: int) -> dict:
    from sa_analysis.planner import plan_spans
    from sa_analysis.planner.strategies import evaluate_plan

    pe = plan_spans(exact, budget=budget, stability_resamples=0)
    ps = plan_spans(sampled, budget=budget, stability_resamples=0)
    priced = evaluate_plan(ps, exact)  # the sampled plan, priced on the exact report
    exact_cost = sum(pe.follower_costs.values())
    heads_differ = sum(int(np.sum(np.asarray(pe.head_map[m]) != np.asarray(ps.head_map[m])))
                       for m in set(pe.head_map) & set(ps.head_map))
    return dict(budget=budget, same_followers=pe.followers == ps.followers, heads_differ=heads_differ,
                same_plan=pe.followers == ps.followers and pe.anchor_of == ps.anchor_of and pe.head_map == ps.head_map,
                exact_followers=pe.followers, sampled_followers=ps.followers,
                aligned_exact=sorted(pe.head_map), aligned_sampled=sorted(ps.head_map),
                exact_cost=exact_cost, sampled_plan_on_exact=sum(priced.follower_costs.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--n-seqs", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.125, help="share of the query rows the sample keeps")
    parser.add_argument("--budgets", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    import transformers

    from sa_analysis.data import token_batch
    from sa_analysis.loading import load_model
    from sa_analysis.pipeline import analyse

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, random_init=args.random_init)
    info = loaded.info
    results = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                   device=torch.cuda.get_device_name() if "cuda" in info.device else "cpu", model=info.name,
                   dtype=info.dtype, torch=torch.__version__, transformers=transformers.__version__, lengths=[])
    for n in args.lengths:
        batch = token_batch(loaded.tokenizer, n_seqs=args.n_seqs, seq_len=n, vocab_size=info.vocab_size)
        rows = int(n * args.fraction)
        start = time.perf_counter()
        exact = analyse(loaded, batch, path="stream", rows="all")
        exact_s = time.perf_counter() - start
        start = time.perf_counter()
        sampled = analyse(loaded, batch, path="stream", rows=rows)
        sampled_s = time.perf_counter() - start
        entry = dict(n=n, n_seqs=args.n_seqs, rows=sampled.sampling["rows"], exact_s=exact_s, sampled_s=sampled_s,
                     kl=within_standard_errors(exact, sampled, "kl"),
                     cosine_flat=within_standard_errors(exact, sampled, "cosine_flat"),
                     plans=[compare_plans(exact, sampled, b) for b in args.budgets])
        results["lengths"].append(entry)
        print(json.dumps(entry), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sampled_plans.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n==== plans from sampled rows vs all rows: {results['model']} ({results['dtype']}), {results['device']}, "
          f"{results['date']} ====")
    for e in results["lengths"]:
        print(f"\n{e['n_seqs']} x {e['n']} tokens: all rows {e['exact_s']:.1f} s, {e['rows']} rows per sequence "
              f"{e['sampled_s']:.1f} s (whole heatmap job)")
        for name in ("kl", "cosine_flat"):
            c = e[name]
            print(f"  {name:<12} median |value| {c['value_median']:.4f}, median standard error {c['se_median']:.2e}; "
                  f"within 2 SE of the exact value: {100 * c['within_2se']:.0f} % (median |z| {c['abs_z_median']:.2f})")
        print(f"  {'budget':>6} | {'same plan':>9} | {'heads mapped otherwise':>22} | {'followers (all rows)':<36} | "
              f"{'followers (sampled)':<36} | {'cost':>8} | {'sampled plan, exact cost':>24}")
        for p in e["plans"]:
            same = "yes" if p["same_plan"] else ("followers" if p["same_followers"] else "no")
            print(f"  {p['budget']:>6} | {same:>9} | {p['heads_differ']:>22} | {str(p['exact_followers']):<36} | "
                  f"{str(p['sampled_followers']):<36} | {p['exact_cost']:>8.4f} | {p['sampled_plan_on_exact']:>24.4f}")


if __name__ == "__main__":
    main()
