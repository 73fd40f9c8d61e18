#!/usr/bin/env python
"""Head-aligned sharing in fast mode: is it as fast as sharing by index? Prefill and decode, index vs head maps.

    PYTHONPATH=. python benchmarks/bench_head_maps.py --out benchmarks/results/   # CUDA, random bf16 weights
    PYTHONPATH=. python benchmarks/bench_head_maps.py --tiny                      # CPU smoke test

Shapes: Llama-2-7B (32 query heads, 32 KV heads: a map only gathers queries and key heads) and Llama-3.1-8B (32
query heads in 8 KV groups: a map that keeps each group's heads together stays grouped; one that mixes groups expands
keys and values to one per query head). Followers 23..30 reuse layer 22 (8 of 32 layers), fast mode. Variants:
  - index: no head map;
  - within groups: each follower's heads permuted inside their KV group (MHA: any permutation);
  - across groups: a random permutation of all query heads (GQA: the expanded path).
Rows: prefill of batch 1 x 4096 tokens (forward) and decode of 128 greedy tokens after a 2048-token prompt at batch 1
(generate), CUDA events, medians of `--repeats` rounds in which every variant runs once in turn (after warm-up);
fast-vs-exact logits with the same maps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis.loading import LoadedModel, describe, load_model  # noqa: E402
from sa_analysis.patch import share_attention  # noqa: E402

T0 = time.time()
FOLLOWERS = list(range(23, 31))


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def head_maps(n_heads: int, n_kv: int, kind: str, seed: int) -> dict[int, list[int]]:
    """{follower: [anchor head per query head]} of the given kind (None for index sharing)."""
    g = torch.Generator().manual_seed(seed)
    groups = n_heads // n_kv
    maps = {}
    for m in FOLLOWERS:
        if kind == "across groups":
            perm = torch.randperm(n_heads, generator=g)
        else:  # within groups: permute inside each group of `groups` heads (any permutation when groups == 1)
            if groups == 1:
                perm = torch.randperm(n_heads, generator=g)
            else:
                perm = torch.cat([k * groups + torch.randperm(groups, generator=g) for k in range(n_kv)])
        maps[m] = perm.tolist()
    return maps


def timed_once(fn) -> float:
    """Seconds of one call of `fn()` (CUDA events on a GPU, perf_counter on a CPU)."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def run_shape(loaded: LoadedModel, prefill: int, prompt: int, n_new: int, warmup: int, repeats: int) -> dict:
    """Every variant measured in the same rounds (index, maps, index, maps, ...), so drift hits all alike; medians."""
    model, info = loaded.model, loaded.info
    plan = {m: 22 for m in FOLLOWERS}
    device = model.device
    ids = torch.randint(0, info.vocab_size, (1, prefill), device=device, generator=torch.Generator(device).manual_seed(0))
    short, prompt_ids = ids[:, :256], ids[:, :prompt]
    variants = {"index": None}
    kinds = ["within groups", "across groups"] if info.n_kv_heads < info.n_heads else ["within groups"]
    for kind in kinds:
        variants[kind] = head_maps(info.n_heads, info.n_kv_heads, kind, seed=1)
    forward = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    decode = lambda: model.generate(prompt_ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,  # noqa: E731
                                    pad_token_id=0, attention_mask=torch.ones_like(prompt_ids))
    times = {name: {"prefill": [], "decode": []} for name in variants}
    out = {}
    with torch.inference_mode():
        for name, maps in variants.items():
            with share_attention(model, plan, mode="exact", head_map=maps):
                exact = model(input_ids=short).logits.float()
            with share_attention(model, plan, mode="fast", head_map=maps):
                fast = model(input_ids=short).logits.float()
                for _ in range(warmup):
                    forward()
                decode()
            out[name] = {"fast_vs_exact_max_abs": float((fast - exact).abs().max()), "logit_scale": float(exact.abs().max())}
        for _ in range(repeats):
            for name, maps in variants.items():
                with share_attention(model, plan, mode="fast", head_map=maps):
                    times[name]["prefill"].append(timed_once(forward))
                    times[name]["decode"].append(timed_once(decode))
    for name in variants:
        p, d = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        out[name].update(prefill_ms=1000 * p, prefill_tokens_per_s=prefill / p, decode_tokens_per_s=n_new / d,
                         prefill_ms_all=[round(1000 * t, 2) for t in times[name]["prefill"]],
                         decode_s_all=[round(t, 4) for t in times[name]["decode"]])
        log(f"{info.name} {name}: prefill {out[name]['prefill_ms']:.1f} ms, decode {out[name]['decode_tokens_per_s']:.1f} tok/s, "
            f"fast-exact {out[name]['fast_vs_exact_max_abs']:.3g} of {out[name]['logit_scale']:.3g}")
    return out


def table(results: dict) -> str:
    lines = ["| shape | sharing | prefill ms | prefill vs index | decode tok/s | decode vs index | fast vs exact (max abs / logit scale) |",
             "|---|---|---|---|---|---|---|"]
    for shape, rows in results.items():
        ref = rows["index"]
        for name, r in rows.items():
            lines.append(f"| {shape} | {name} | {r['prefill_ms']:.1f} | {ref['prefill_ms'] / r['prefill_ms']:.3f}x | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / ref['decode_tokens_per_s']:.3f}x | "
                         f"{r['fast_vs_exact_max_abs']:.3g} / {r['logit_scale']:.3g} |")
    return "\n".join(lines)


def tiny(n_kv: int) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=32, hidden_size=128, num_attention_heads=8,
                                  num_key_value_heads=n_kv, intermediate_size=256, vocab_size=512, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    return LoadedModel(model, None, describe(model, f"tiny-llama-32-kv{n_kv}", "tiny", "random-init"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test on tiny 32-layer shapes")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.tiny:
        shapes = {"tiny MHA": lambda: tiny(8), "tiny GQA": lambda: tiny(2)}
        prefill, prompt, n_new, warmup, repeats = 256, 128, 8, 1, 3
    else:
        shapes = {alias: (lambda a=alias: load_model(a, random_init=True, dtype="bfloat16", device="cuda"))
                  for alias in ("llama2-7b", "llama3.1-8b")}
        prefill, prompt, n_new, warmup, repeats = 4096, 2048, 128, 3, args.repeats
    results = {}
    for name, make in shapes.items():
        loaded = make()
        log(f"loaded {name}")
        results[name] = run_shape(loaded, prefill, prompt, n_new, warmup, repeats)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(table(results))
    if args.out:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        path = args.out / f"{stamp}-head-maps.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2))
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
