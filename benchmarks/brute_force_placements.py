"""Every placement of B shared layers, measured: held-out perplexity of each, and where the planner's choices rank.

The check the planner and the validation loop are judged by: on the default model with a 3-layer budget, is the
recommended plan near the best of *all* placements (measured one by one, independently of any prediction)?

    PYTHONPATH=. python benchmarks/brute_force_placements.py --budget 3 --out results/brute.json

CPU: about 0.3 s a placement for 4 x 128 held-out tokens on 2 cores (3654 placements for budget 3: ~20 min);
a GPU does them in a few minutes (`--device cuda`, float32 by default so the perplexities match the CPU's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from sa_analysis.data import token_batch
from sa_analysis.loading import load_model
from sa_analysis.pipeline import analyse
from sa_analysis.planner import anchors_for, plan_spans
from sa_analysis.search import search_plans
from sa_analysis.validate import measure_quality, untouched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--n-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", help="float32 by default, also on GPU: perplexities to compare")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    n_layers = loaded.info.n_layers
    calibration = token_batch(loaded.tokenizer, split="calibration", n_seqs=args.n_seqs, seq_len=args.seq_len)
    heldout = token_batch(loaded.tokenizer, split="heldout", n_seqs=args.n_seqs, seq_len=args.seq_len)
    report = analyse(loaded, token_batch(loaded.tokenizer, split="calibration", n_seqs=8, seq_len=256))
    similarity_plan = plan_spans(report, budget=args.budget).followers
    search = search_plans(loaded, report, calibration, heldout, budgets=[args.budget], tolerance=10.0,
                          stop_early=False, progress=lambda message: None)
    validated_plan = list(search.best["followers"])
    reference = untouched(loaded.model, heldout)

    def perplexity(followers) -> float:
        return measure_quality(loaded.model, anchors_for(list(followers), n_layers), reference)["ppl_patched"]

    results = {}
    placements = list(itertools.combinations(range(1, n_layers), args.budget))
    for i, followers in enumerate(placements):
        results[followers] = perplexity(followers)
        if i % 500 == 0:
            print(f"[{time.time() - started:7.1f}s] {i}/{len(placements)}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            partial = {"similarity_plan": similarity_plan, "validated_plan": validated_plan,
                       "results": [[list(k), v] for k, v in results.items()]}
            args.out.with_suffix(".partial.json").write_text(json.dumps(partial))
    ranked = sorted(results.items(), key=lambda kv: kv[1])
    order = [k for k, _ in ranked]
    best = ranked[0][1]

    def where(followers) -> dict:
        key = tuple(sorted(followers))
        return {"followers": list(key), "ppl": results[key], "rank": order.index(key) + 1,
                "above_best": results[key] / best - 1}

    summary = {
        "model": args.model, "budget": args.budget, "heldout_tokens": args.n_seqs * args.seq_len,
        "n_placements": len(placements), "baseline_ppl": measure_quality(loaded.model, {}, reference)["ppl_baseline"],
        "best": {"followers": list(ranked[0][0]), "ppl": best}, "worst": {"followers": list(ranked[-1][0]), "ppl": ranked[-1][1]},
        "median_ppl": ranked[len(ranked) // 2][1],
        "similarity_plan": where(similarity_plan), "validated_plan": where(validated_plan),
        "seconds": round(time.time() - started, 1), "top10": [[list(k), v] for k, v in ranked[:10]],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "top10"}, indent=2))


if __name__ == "__main__":
    main()
