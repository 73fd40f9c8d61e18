#!/usr/bin/env python
"""Healing benchmark: quality recovered on the real default model (CPU), throughput and memory (GPU).

Quality (real weights; the default model on CPU, about 3-6 minutes on 2 cores):

    python benchmarks/bench_heal.py --out results/heal-cpu                  # 3-layer plan, LoRA, 30 steps
    python benchmarks/bench_heal.py --out results/heal-cpu --control        # + the same heal without sharing

  Loads smollm2-135m, makes a 3-layer plan (`--budget`, from an attention report on the calibration text, or
  `--plan PLAN.json`), heals on the default calibration text and reports baseline / patched / healed perplexity on
  held-out text, the share of the loss recovered and the time taken. `--control` also heals the *unshared* model
  with the same settings: fine-tuning on the calibration text also adapts the model to its domain (CPython docs),
  so the healed perplexity can fall below the baseline; the control separates that domain gain from the recovery.

Throughput (random weights, no tokenizer or GGUF needed, e.g. on a GPU machine):

    python benchmarks/bench_heal.py --random-init --model llama2-7b --spans 24-26 --seq-len 1024 --steps 20

  Synthetic data (Zipf-distributed tokens whose second half repeats the first, so the loss falls when attention
  learns to copy) checks that the loss decreases through the shared layers; the numbers are tokens/s and peak
  memory, not quality (random weights have none to recover). Under `accelerate launch --num_processes N` the same
  script runs data-parallel (each process one GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def synthetic_data(vocab: int, seq_len: int, n: int, seed: int = 0):
    """HealData of `n` sequences: Zipf tokens over 2048 ids, second half a copy of the first (learnable)."""
    from sa_analysis.heal import HealData

    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, 2049, dtype=torch.float64)
    probs = (1 / ranks) / (1 / ranks).sum()
    half = seq_len // 2
    rows = []
    for _ in range(n):
        first = torch.multinomial(probs, half, replacement=True, generator=g) + 3
        ids = torch.cat([first, first, first[: seq_len - 2 * half]]) % vocab
        rows.append((ids, ids.clone()))
    return HealData(rows, "text", f"synthetic zipf-copy ({n} x {seq_len})", 0, n)


def make_plan(loaded, args, out: Path):
    from sa_analysis.planner import SharePlan

    info = loaded.info
    if args.plan:
        return SharePlan.load(args.plan)
    if args.spans:
        return SharePlan.from_spans(args.spans, info.n_layers, model=info.shape())
    from sa_analysis.data import token_batch
    from sa_analysis.pipeline import analyse
    from sa_analysis.planner import plan_spans

    started = time.perf_counter()
    batch = token_batch(loaded.tokenizer, split="calibration", n_seqs=args.plan_seqs, seq_len=256)
    plan = plan_spans(analyse(loaded, batch), budget=args.budget)
    log(f"plan from {batch.n_seqs} x {batch.seq_len} calibration tokens in {time.perf_counter() - started:.0f} s: {plan.summary()}")
    plan.save(out / "plan.json")
    return plan


def one_heal(args, plan_or_none, out: Path, label: str):
    from sa_analysis.data import token_batch
    from sa_analysis.heal import HealConfig, heal, load_heal_data
    from sa_analysis.loading import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, random_init=args.random_init)
    plan = make_plan(loaded, args, out) if plan_or_none is None else plan_or_none
    config = HealConfig(method=args.method, objective=args.objective, lm_weight=args.lm_weight, lora_rank=args.rank, lora_mlp=args.lora_mlp, train_layers=args.train_layers,
                        full_scope=args.full_scope, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                        grad_accum=args.grad_accum, seq_len=args.seq_len, save_every=0, seed=args.seed)
    n_examples = args.steps * args.batch_size * args.grad_accum * 8  # enough for every process
    if args.random_init:
        vocab = loaded.info.vocab_size
        data = synthetic_data(vocab, args.seq_len, n_examples)
        eval_ids = synthetic_data(vocab, args.seq_len, args.eval_seqs, seed=1)
        eval_batch = torch.stack([ids for ids, _ in eval_ids.examples])
    else:
        data = load_heal_data(args.data, loaded.tokenizer, seq_len=args.seq_len, max_examples=n_examples)
        eval_batch = token_batch(loaded.tokenizer, split="heldout", n_seqs=args.eval_seqs, seq_len=args.eval_len)
    heal_plan = plan if label == "shared" else _empty_like(plan)

    def on_step(step, loss):
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            log(f"  {label} step {step}/{args.steps} loss {loss:.4f}")

    started = time.perf_counter()
    export = label == "shared" and not args.no_export
    report = heal(loaded, heal_plan, data, eval_batch, config, out=out / label, on_step=on_step, export=export)
    total = time.perf_counter() - started
    if report is None:  # not the main process
        return None, plan
    report.run["total_seconds"] = round(total, 1)
    if export:
        report.run["reload"] = reload_check(loaded, report.files["model"], eval_batch, args)
        log(f"export reloaded with load_shared: {report.run['reload']}")
    report.save(out / label / "heal_report.json")
    log(f"{label}: {report.summary()}; train {report.run['seconds']:.0f} s, total with evaluation {total:.0f} s, "
        f"{report.run['tokens_per_s']} tokens/s")
    return report, plan


def reload_check(loaded, folder, eval_batch, args):
    """load_shared(folder) against the in-memory healed model: are the logits identical?"""
    from sa_analysis.shared_model import load_shared

    ids = (eval_batch.input_ids if hasattr(eval_batch, "input_ids") else eval_batch)[:2]
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    device = str(next(loaded.model.parameters()).device)
    again = load_shared(folder, device=device, dtype=dtype)
    with torch.no_grad():
        a = loaded.model(input_ids=ids.to(device), use_cache=False).logits
        b = again.model(input_ids=ids.to(device), use_cache=False).logits
    result = {"identical": bool(torch.equal(a, b)), "max_abs_diff": float((a.float() - b.float()).abs().max()),
              "patched": bool(again.share is not None and again.share.active)}
    del again
    return result


def _empty_like(plan):
    from sa_analysis.planner import SharePlan

    return SharePlan.empty(plan.n_layers, model=plan.model)


def objective_cost(args, out: Path) -> int:
    """The same plan healed with each objective, one after the other in this process: training seconds per step,
    the ratio distill / lm (the teacher's forward is the only extra work), and the faithfulness each reached."""
    args.no_export, rows, plan = True, {}, None
    for objective in ("lm", "distill"):
        args.objective = objective
        report, plan = one_heal(args, plan, out / objective, "shared")
        g = report.gaps("held-out")
        rows[objective] = {"seconds_per_step": report.run["seconds_per_step"], "seconds": report.run["seconds"],
                           "kl_before": g["kl_before"], "kl_after": g["kl_after"], "ppl_before": g["before"],
                           "ppl_after_untouched": g["after_untouched"]}
    ratio = rows["distill"]["seconds_per_step"] / rows["lm"]["seconds_per_step"]
    print(f"\n{'objective':<10} {'s/step':>8} {'KL before':>10} {'KL after':>9} {'ppl vs untouched after':>23}")
    for objective, r in rows.items():
        print(f"{objective:<10} {r['seconds_per_step']:>8.2f} {r['kl_before']:>10.3f} {r['kl_after']:>9.3f} "
              f"{100 * math.expm1(r['ppl_after_untouched']):>+22.1f}%")
    print(f"distill / lm seconds per step: {ratio:.2f}x ({plan.summary()}, {args.steps} steps of {args.batch_size} x "
          f"{args.seq_len}, {torch.get_num_threads()} threads)")
    (out / "objective_cost.json").write_text(json.dumps({"args": vars(args), "rows": rows, "ratio": ratio,
                                                         "plan": plan.summary()}, indent=2, default=str) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--plan", default=None, help="plan.json (default: plan --budget layers from a report)")
    parser.add_argument("--spans", default=None, help="instead of --plan: followers as ranges, e.g. 24-26")
    parser.add_argument("--budget", type=int, default=3)
    parser.add_argument("--plan-seqs", type=int, default=8)
    parser.add_argument("--data", default=None, help="heal data (default: the default calibration text)")
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-mlp", action="store_true")
    parser.add_argument("--train-layers", default="all", choices=["all", "from-anchor", "from-follower"])
    parser.add_argument("--full-scope", default="all", choices=["all", "attention", "followers-vo"])
    parser.add_argument("--objective", default="lm", choices=["lm", "distill"])
    parser.add_argument("--lm-weight", type=float, default=0.0)
    parser.add_argument("--cost", action="store_true", help="time the same heal with each objective (lm, distill) and "
                        "print the ratio of their training seconds (no control, no export)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-seqs", type=int, default=16)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--control", action="store_true", help="also heal the unshared model with the same settings")
    parser.add_argument("--no-export", action="store_true", help="skip the export (and its reload check)")
    parser.add_argument("--out", default="results/heal")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    if args.cost:
        return objective_cost(args, out)
    report, plan = one_heal(args, None, out, "shared")
    summary = {"args": vars(args)}
    if report is not None:
        p = report.evals["held-out"]["perplexity"]
        summary.update(plan=plan.summary(), perplexity=p, run=report.run,
                       loss_first=report.losses[0], loss_last=report.losses[-1])
    if args.control:
        control, _ = one_heal(args, plan, out, "control")
        if control is not None and report is not None:
            pc = control.evals["held-out"]["perplexity"]
            healed_unshared = pc["healed"]
            summary["control"] = {"healed_unshared": healed_unshared, "run": control.run}
            # the gap sharing leaves after healing, against the same fine-tune without sharing
            gap_before = math.log(p["patched"] / p["baseline"])
            gap_after = math.log(p["healed"] / healed_unshared)
            summary["control"]["log_gap_before"] = gap_before
            summary["control"]["log_gap_after"] = gap_after
            summary["control"]["gap_closed"] = 1 - gap_after / gap_before if gap_before > 0 else None
            log(f"control (no sharing, same heal): perplexity {healed_unshared:.4g}; sharing's log-perplexity gap "
                f"{gap_before:.4f} before healing, {gap_after:.4f} after (vs the healed unshared model)")
    if report is not None:
        (out / "bench_heal.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        log(f"wrote {out / 'bench_heal.json'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
