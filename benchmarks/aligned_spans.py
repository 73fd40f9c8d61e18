"""Head-aligned vs index sharing on the default model: every contiguous 3-layer span, predicted and measured, and the
budget-3 plans of `recommend-spans --validate` checked by an independent implementation.

1. The report (8 x 256 calibration tokens) prices each span by index and under the best head maps (Hungarian on
   the cross-head KL); `measure_quality` (our validate) measures both on held-out text.
2. `search_plans` with --align-heads auto and off, budget 3 (tolerance wide open, so a 3-layer plan is chosen), and
   both chosen plans plus the best contiguous span by index re-measured by `independent_perplexity`: its own eager
   attention function in float64 that shares nothing with sa_analysis.patch (a follower multiplies its own values by
   the rows of its anchor's softmax that its head map names).

    PYTHONPATH=. python benchmarks/aligned_spans.py --out benchmarks/results/aligned_spans.json

CPU (2 cores): about 10 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from sa_analysis.data import token_batch
from sa_analysis.loading import load_model
from sa_analysis.pipeline import analyse
from sa_analysis.planner import PlanConstraints, SharePlan, anchors_for, price_pairs
from sa_analysis.search import search_plans
from sa_analysis.validate import measure_quality, untouched


def independent_perplexity(model, ids: torch.Tensor, anchor_of: dict[int, int], head_map: dict[int, list[int]]) -> float:
    """Held-out perplexity of `model` sharing attention as `anchor_of` / `head_map` say, computed by a float64 eager
    copy with its own attention function (no sa_analysis code runs in the forward)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    probs: dict[int, torch.Tensor] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **_):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)  # [B, H, K, D]
        value = value.repeat_interleave(groups, dim=1)  # [B, H, K, D]
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling  # [B, H, Q, K]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1)
        layer = module.layer_idx
        if layer in anchor_of:
            weights = probs[anchor_of[layer]]
            if layer in head_map:
                weights = weights[:, head_map[layer]]  # head h reuses anchor head map[h]
        else:
            probs[layer] = weights
        return torch.einsum("bhqk,bhkd->bqhd", weights, value), None

    AttentionInterface.register("benchmark_independent", attention)
    AttentionMaskInterface.register("benchmark_independent", AttentionMaskInterface()["eager"])
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("benchmark_independent")
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in ids:
            logits = reference(input_ids=row[None], use_cache=False).logits[0, :-1]  # [T-1, V]
            nll -= float(torch.log_softmax(logits, -1).gather(-1, row[1:, None]).sum())
            count += row.numel() - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.time()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    n_layers = loaded.info.n_layers
    tok = loaded.tokenizer
    report = analyse(loaded, token_batch(tok, split="calibration", n_seqs=8, seq_len=256))
    heldout = token_batch(tok, split="heldout", n_seqs=8, seq_len=256)
    calibration = token_batch(tok, split="calibration", n_seqs=4, seq_len=128)
    base = untouched(loaded.model, heldout)
    prices = price_pairs(report, "kl", "on")

    spans = []
    for first in range(1, n_layers - 2):
        followers = [first, first + 1, first + 2]
        anchor = first - 1
        maps = {m: [int(g) for g in prices.alignment.maps[m, anchor]] for m in followers}
        plan = anchors_for(followers, n_layers)
        by_index = measure_quality(loaded.model, plan, base)
        aligned = measure_quality(loaded.model, plan, base, head_map=maps)
        spans.append({"followers": followers, "anchor": anchor,
                      "predicted_index": float(sum(prices.by_index[m, anchor] for m in followers)),
                      "predicted_aligned": float(sum(prices.alignment.aligned[m, anchor] for m in followers)),
                      "ppl_baseline": by_index["ppl_baseline"], "ppl_index": by_index["ppl_patched"],
                      "ppl_aligned": aligned["ppl_patched"], "kl_index": by_index["kl_mean"], "kl_aligned": aligned["kl_mean"],
                      "head_map": {str(m): h for m, h in maps.items()}})
        print(f"[{time.time() - started:6.0f}s] {first}-{first + 2}: index {by_index['ppl_patched']:.2f} "
              f"aligned {aligned['ppl_patched']:.2f}", flush=True)

    chosen = {}
    for align in ("auto", "off"):
        search = search_plans(loaded, report, calibration, heldout, budgets=[3], tolerance=10.0, stop_early=False,
                              constraints=PlanConstraints(align_heads=align))
        chosen[align] = search.best_plan
        print(f"[{time.time() - started:6.0f}s] --align-heads {align}: {chosen[align].summary()}", flush=True)
    best_index = min(spans, key=lambda s: s["ppl_index"])
    contenders = {"validated, --align-heads auto": chosen["auto"], "validated, --align-heads off": chosen["off"],
                  "best contiguous span by index": SharePlan(n_layers, best_index["followers"])}
    independent = {}
    for name, plan in contenders.items():
        ppl = independent_perplexity(loaded.model, heldout.input_ids, plan.anchor_of, {m: list(h) for m, h in plan.head_map.items()})
        ours = measure_quality(loaded.model, plan, base)["ppl_patched"]
        independent[name] = {"followers": plan.followers, "aligned": plan.aligned_followers, "ppl_independent": ppl, "ppl_ours": ours}
        print(f"[{time.time() - started:6.0f}s] {name}: {plan.spans_spec()} aligned {plan.aligned_followers} -> "
              f"independent {ppl:.3f}, ours {ours:.3f}", flush=True)
    out = {"model": args.model, "heldout": heldout.describe(), "baseline_ppl": spans[0]["ppl_baseline"],
           "spans": spans, "plans": independent, "seconds": round(time.time() - started, 1),
           "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
