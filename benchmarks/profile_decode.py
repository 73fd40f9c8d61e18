#!/usr/bin/env python
"""Where a compiled decode step spends its time, unpatched against patched (`mode="infer"`): the kernels of a few
`generate()` steps under `torch.profiler`, grouped by name, with their total CUDA time per step; and the step time
measured two ways, the patch applied and removed around every round (as `bench_decode.py` alternates) and the patch
kept on for all of its rounds, to tell a slower step from the cost of switching.

    PYTHONPATH=. python benchmarks/profile_decode.py --cell 8x2048 --out results/
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import Timer, generate_seconds, log, step_ms  # noqa: E402
from sa_analysis.loading import load_model  # noqa: E402
from sa_analysis.patch import share_attention  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402


def profiled(model, prompt, n_new: int) -> dict[str, float]:
    """{kernel name: total CUDA microseconds} of one profiled generate of `n_new` tokens."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate_seconds(model, prompt, n_new, True, Timer(prompt.device))
    found: dict[str, float] = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if total:
            found[event.key[:90]] = found.get(event.key[:90], 0.0) + total
    return found


def kernels(model, prompt, n_new: int) -> dict[str, float]:
    """{kernel name: CUDA microseconds per decode step}: a generate of `n_new` tokens less a generate of one (the
    prefill), over the `n_new - 1` decode steps."""
    many, one = profiled(model, prompt, n_new), profiled(model, prompt, 1)
    return {name: (many.get(name, 0.0) - one.get(name, 0.0)) / (n_new - 1) for name in set(many) | set(one)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--spans", default="23-30")
    parser.add_argument("--cell", default="8x2048")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    batch, context = (int(x) for x in args.cell.split("x"))
    loaded = load_model(args.model, random_init=True, device="cuda", dtype="bfloat16")
    model = loaded.model
    plan = SharePlan.from_spans(args.spans, loaded.info.n_layers, model=loaded.info.shape())
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(batch))
    result: dict = {"cell": args.cell, "device": torch.cuda.get_device_name(), "torch": torch.__version__}

    # 1. the patch kept on for all of its rounds, then off for all of the others
    kept: dict[str, list[float]] = {"unpatched": [], "patched": []}
    for _ in range(args.repeats + 1):
        kept["unpatched"].append(step_ms(model, prompt, args.new_tokens, True))
    with share_attention(model, plan, mode="infer"):
        for _ in range(args.repeats + 1):
            kept["patched"].append(step_ms(model, prompt, args.new_tokens, True))
        patched_kernels = kernels(model, prompt, args.new_tokens)
    unpatched_kernels = kernels(model, prompt, args.new_tokens)
    result["kept"] = {k: statistics.median(v[1:]) for k, v in kept.items()}
    log(f"patch kept on: unpatched {result['kept']['unpatched']:.2f} ms/step, patched {result['kept']['patched']:.2f}"
        f" ms/step, {result['kept']['unpatched'] / result['kept']['patched']:.3f}x")

    # 2. applied and removed around every round (bench_decode.py's way)
    alternating: dict[str, list[float]] = {"unpatched": [], "patched": []}
    for _ in range(args.repeats):
        alternating["unpatched"].append(step_ms(model, prompt, args.new_tokens, True))
        with share_attention(model, plan, mode="infer"):
            alternating["patched"].append(step_ms(model, prompt, args.new_tokens, True))
    result["alternating"] = {k: statistics.median(v) for k, v in alternating.items()}
    log(f"alternating: unpatched {result['alternating']['unpatched']:.2f}, patched "
        f"{result['alternating']['patched']:.2f} ms/step")

    # 3. kernels per step, side by side
    names = sorted(set(unpatched_kernels) | set(patched_kernels),
                   key=lambda n: -max(unpatched_kernels.get(n, 0), patched_kernels.get(n, 0)))
    print("\n| kernel | unpatched us/step | patched us/step | difference |")
    print("|---|---|---|---|")
    for name in names[:30]:
        u, p = unpatched_kernels.get(name, 0.0), patched_kernels.get(name, 0.0)
        print(f"| {name} | {u:.1f} | {p:.1f} | {p - u:+.1f} |")
    total_u, total_p = sum(unpatched_kernels.values()), sum(patched_kernels.values())
    print(f"| all kernels | {total_u:.1f} | {total_p:.1f} | {total_p - total_u:+.1f} |")
    result["kernels"] = {"unpatched": unpatched_kernels, "patched": patched_kernels}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_decode_{args.cell}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
