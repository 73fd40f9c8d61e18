#!/usr/bin/env python
"""Decode speed the way users decode: `generate()` of the unpatched and the patched model under the same settings,
eager (dynamic cache) and compiled (static cache: transformers compiles the step with CUDA graphs), with the
inference path (`mode="infer"`: followers reuse their anchor's softmax row at decode, reading no keys).

    PYTHONPATH=. python benchmarks/bench_decode.py --out results/            # CUDA: Llama-2-7B shape, random bf16
    PYTHONPATH=. python benchmarks/bench_decode.py --model llama3.1-8b --cells 1x2048,8x2048,1x32768

For each cell (batch x context): a prompt of `context` tokens, `--new-tokens` greedy tokens (`new_tokens_for`); ms per decode step =
(time of generate(N) - time of generate(1)) / (N - 1), median of `--repeats` rounds after a warm-up, CUDA events,
rounds alternating unpatched / patched, one untimed generate after every switch. Beside each measured ratio, the ratio predicted from the bytes a step reads
(weights + KV cache; followers skip q/k weights and the K cache: `bench_patch.predictions`). Cells whose KV cache
and weights would not fit in 90 % of the GPU's memory are skipped and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

# before CUDA starts: the long-context cell at the largest batch that fits ran out of memory on the H100 with 16.9 GiB
# reserved but free (fragmentation; 2026-12-07), and ran with a peak of 69.8 GiB with expandable segments
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_patch import predictions  # noqa: E402
from sa_analysis.loading import load_model  # noqa: E402
from sa_analysis.patch import cache_bytes, kernels, share_attention  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402
from sa_analysis.validate.speed import Timer, generate_options, generate_seconds, generate_step_seconds  # noqa: E402

T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def step_ms(model, prompt, n_new, compiled) -> float:
    """ms per decode step (`validate.speed.generate_step_seconds`: the generate of n_new tokens less the generate of
    one, over n_new - 1 steps; CUDA events)."""
    return 1000 * generate_step_seconds(model, prompt, n_new, compiled, Timer(prompt.device))


def memory(model, prompt, n_new: int, compiled: bool) -> dict:
    """KV-cache bytes after one generate of `n_new` tokens, and the peak memory allocated during it (GiB)."""
    options = generate_options(prompt, n_new, compiled)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = model.generate(prompt, **options, return_dict_in_generate=True)
    torch.cuda.synchronize()
    return {"kv_bytes": cache_bytes(out.past_key_values)["total"], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


OTHER_PATH = {"compiled": "patched matmul", "eager": "patched kernels"}  # --other-path: the path the library does not take


@contextlib.contextmanager
def variant(model, plan, name: str, mode: str):
    """The model as `name` runs it: unpatched, patched (the library's defaults: the kernels in a compiled step, the
    batched matmuls in eager steps), "patched matmul" (the kernels off: what ran before the split-key kernels) or
    "patched kernels" (the kernels in eager steps too, `kernels.IN_EAGER`)."""
    if name == "unpatched":
        yield
        return
    with kernels.settings(ENABLED=name != "patched matmul", IN_EAGER=kernels.IN_EAGER or name == "patched kernels"), \
            share_attention(model, plan, mode=mode):
        yield


def cell(model, plan, batch: int, context: int, n_new: int, compiled: bool, repeats: int, mode: str = "infer",
         names: tuple[str, ...] = ("unpatched", "patched")) -> dict:
    """Median ms per step of the unpatched and the patched model, alternating round by round; after every switch one
    untimed generate, so that what a switch costs (the compiled step recompiled or its CUDA graph re-recorded for the
    other model) stays out of the timing (2026-12-07: without it, batch 8 at 2k read 0.978x, with the patch kept on
    1.088x, `profile_decode.py`)."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device="cuda",
                           generator=torch.Generator("cuda").manual_seed(batch))
    times: dict[str, list[float]] = {name: [] for name in names}
    memories = {}
    for round_ in range(repeats + 1):
        for name in times:
            with variant(model, plan, name, mode):
                generate_seconds(model, prompt, n_new, compiled, Timer(prompt.device))  # the switch's cost, untimed
                value = step_ms(model, prompt, n_new, compiled)
                if not round_:
                    memories[name] = memory(model, prompt, n_new, compiled)
            if round_:
                times[name].append(value)
    found = {name: statistics.median(values) for name, values in times.items()}
    return {"ms_per_step": found, "all": times, "memory": memories,
            "speedup": {name: found["unpatched"] / found[name] for name in names if name != "unpatched"}}


def print_table(rows: list[dict]) -> None:
    """One row per cell: ms per step and tokens/s of each model, the measured and predicted ratios, KV and peak memory."""
    print("\n| decode | batch | context | unpatched ms/step | patched ms/step | tokens/s unpatched -> patched | measured "
          "| predicted | patched, other path | KV GiB unpatched -> patched | peak GiB unpatched -> patched |")
    print("|---" * 11 + "|")
    for r in rows:
        ms, mem = r["ms_per_step"], r["memory"]
        other = OTHER_PATH[r["kind"]]
        off = f"{r['speedup'][other]:.3f}x ({other})" if other in r["speedup"] else "-"
        print(f"| {r['kind']} | {r['batch']} | {r['context']} | {ms['unpatched']:.2f} | {ms['patched']:.2f} | "
              f"{1000 * r['batch'] / ms['unpatched']:,.0f} -> {1000 * r['batch'] / ms['patched']:,.0f} | "
              f"**{r['speedup']['patched']:.3f}x** | {r['predicted_speedup']:.3f}x | {off} | "
              f"{mem['unpatched']['kv_bytes'] / 2**30:.2f} -> {mem['patched']['kv_bytes'] / 2**30:.2f} | "
              f"{mem['unpatched']['peak_gib']:.1f} -> {mem['patched']['peak_gib']:.1f} |")


def fits(loaded, batch: int, context: int, n_new: int) -> bool:
    """Whether weights, the static KV cache (bf16) and prefill's largest transients (about four [B, T, intermediate]
    bf16 tensors in the MLP: 3.2 GB at batch 1, 32k on the H100, 2026-12-07) fit in 92 % of the GPU's memory."""
    info = loaded.info
    kv = batch * (context + n_new) * info.n_layers * 2 * info.n_kv_heads * info.head_dim * 2
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    transient = 4 * batch * context * getattr(loaded.model.config, "intermediate_size", 4 * info.hidden_size) * 2
    return kv * 1.05 + weights + transient < 0.92 * torch.cuda.get_device_properties(0).total_memory


def cell_shape(loaded, spec: str, n_new: int) -> tuple[int, int]:
    """(batch, context) of a cell "BxC"; B "max" is the largest batch whose cache and weights fit (`fits`): the long-
    context cell of issue 35 is measured at the largest batch that fits the GPU at hand."""
    batch, context = spec.rsplit("x", 1)
    if batch != "max":
        return int(batch), int(context)
    largest = 1
    while largest < 256 and fits(loaded, largest + 1, int(context), n_new):
        largest += 1
    return largest, int(context)


def new_tokens_for(context: int, asked: int | None) -> int:
    """Tokens each timed generate decodes: `asked`, else 64, and 128 from 16k context on. The step is the generate of N
    tokens less the generate of one, over N - 1, so the prefill's noise is divided by N - 1: at 32k the prefill takes
    seconds, and 64 tokens read 1.07x to 1.14x round to round where 128 read 1.13x to 1.16x (H100, 2026-12-07/08)."""
    return asked if asked is not None else (128 if context >= 16384 else 64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--spans", default="23-30")
    parser.add_argument("--cells", default="1x2048,8x2048,32x2048,1x8192,8x8192,1x32768,3x32768",
                        help="batch x context, comma-separated; batch 'max': the largest that fits")
    parser.add_argument("--kinds", default="eager,compiled")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens a timed generate decodes (default 64, 128 from 16k context on: new_tokens_for)")
    parser.add_argument("--mode", default="infer", choices=("infer", "fast", "exact"), help="the patch's mode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--other-path", action="store_true",
                        help="also time the patched model on the decode path the library does not take: compiled with "
                             "the kernels off (batched matmuls), eager with the kernels on")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import transformers
    import triton

    loaded = load_model(args.model, random_init=True, device="cuda", dtype="bfloat16")
    plan = SharePlan.from_spans(args.spans, loaded.info.n_layers, model=loaded.info.shape())
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"triton {triton.__version__}; "
        f"{args.model} random bf16, {plan.summary()}, mode {args.mode}")
    rows = []
    for kind in args.kinds.split(","):
        for spec in args.cells.split(","):
            n_new = new_tokens_for(int(spec.rsplit("x", 1)[1]), args.new_tokens)
            batch, context = cell_shape(loaded, spec, n_new)
            if not fits(loaded, batch, context, n_new):
                log(f"{kind} b{batch} ctx{context}: skipped (does not fit)")
                continue
            names = ("unpatched", "patched", *([OTHER_PATH[kind]] if args.other_path else []))
            measured = cell(loaded.model, plan, batch, context, n_new, kind == "compiled", args.repeats, args.mode, names)
            pred = predictions(loaded, plan, context, context, n_new, batch)
            row = {"kind": kind, "batch": batch, "context": context, "new_tokens": n_new, **measured,
                   "predicted_speedup": pred["decode_speedup"]}
            rows.append(row)
            log(f"{kind} b{batch} ctx{context}: " + ", ".join(f"{n} {v:.2f}" for n, v in measured["ms_per_step"].items())
                + f" ms/step; patched {row['speedup']['patched']:.3f}x (predicted {row['predicted_speedup']:.3f}x)")
            torch._dynamo.reset()  # each cell compiles its own step; do not let earlier graphs pile up
    print_table(rows)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_decode.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                               "device": torch.cuda.get_device_name()},
                                                              indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
