#!/usr/bin/env python
"""Shared Attention patch, baseline vs patched: prefill and decode throughput, KV-cache bytes, peak memory, next to
what the bytes and FLOPs saved predict.

    PYTHONPATH=. python benchmarks/bench_patch.py --out results/     # CUDA: Llama-2-7B shape, random bf16 weights
    PYTHONPATH=. python benchmarks/bench_patch.py --tiny             # CPU smoke test: a tiny 32-layer shape

Default (CUDA): `load_model("llama2-7b", random_init=True, dtype="bfloat16")`, followers 23..30 (8 of 32 layers,
all reusing layer 22: the SA reference repo's choice), fast mode. Rows:
  - prefill: batch 1 x 4096 tokens;
  - decode: 256 greedy tokens after a 2048-token prompt, batch 1 and batch 8 (dynamic cache).
Rounds alternate baseline / patched; times are medians of CUDA events (perf_counter on the CPU) after warm-up.
A sanity check first compares fast and exact mode logits on a short input (bf16) and runs generate().

Predictions (printed next to the measured ratios), from the model's shape:
  - KV bytes: followers keep V only -> patched / baseline = 1 - n_f / (2 L).
  - prefill (compute-bound): followers skip q_proj and k_proj -> time ratio 1 - (Q/K FLOPs saved) / (all FLOPs),
    all FLOPs = 2 * parameters (embedding lookup excluded) + attention scores (fast mode still computes the
    followers' scores, so they are not saved).
  - decode (memory-bound): each step reads all weights and the KV cache; followers skip the q/k weights and the K
    cache -> time ratio 1 - (bytes saved) / (bytes read), at the mean context length of the decode.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis.loading import LoadedModel, describe, load_model  # noqa: E402
from sa_analysis.patch import share_attention  # noqa: E402
from sa_analysis.planner import SharePlan  # noqa: E402
from sa_analysis.validate import compare_speed  # noqa: E402

GIB = 1024**3
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


# ----- the model -----------------------------------------------------------------------------------------------
def tiny_loaded(device: str) -> LoadedModel:
    """A 32-layer Llama shape small enough for a CPU (same layer count, so followers 23..30 still apply)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=32, hidden_size=128, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=256, vocab_size=512,
                                  max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    return LoadedModel(model=model, tokenizer=None, info=describe(model, "tiny-llama-32", "tiny", "random-init"))


# ----- predictions ---------------------------------------------------------------------------------------------
def predictions(loaded: LoadedModel, plan: SharePlan, prefill_len: int, prompt_len: int, n_new: int, batch: int) -> dict:
    """Predicted patched / baseline ratios from the shape: KV bytes, prefill time, decode time (see module doc)."""
    info, model = loaded.info, loaded.model
    L, nf, hidden, hq, hkv, d = info.n_layers, plan.n_shared, info.hidden_size, info.n_heads, info.n_kv_heads, info.head_dim
    elem = next(model.parameters()).element_size()
    embed = model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in model.parameters())
    qk_params = hidden * (hq * d + hkv * d)  # per layer
    # prefill: FLOPs per token (matmuls 2 * params without the embedding lookup; causal scores + PV at mean context n/2)
    score_flops = lambda n: L * 2 * 2 * hq * d * (n / 2)  # noqa: E731
    prefill_flops = 2 * (params - embed) + score_flops(prefill_len)
    prefill_ratio = 1 - nf * 2 * qk_params / prefill_flops
    # decode: bytes read per step (weights + KV cache at the mean context of the decode)
    ctx = prompt_len + n_new / 2
    kv_bytes = batch * ctx * L * 2 * hkv * d * elem
    weight_bytes = (params - embed) * elem  # the embedding is read one row per token
    saved = nf * qk_params * elem + batch * ctx * nf * hkv * d * elem
    decode_ratio = 1 - saved / (weight_bytes + kv_bytes)
    savings = plan.savings(context_len=prefill_len, bytes_per_element=elem)
    return {"kv_bytes_ratio": 1 - nf / (2 * L), "prefill_time_ratio": prefill_ratio, "decode_time_ratio": decode_ratio,
            "prefill_speedup": 1 / prefill_ratio, "decode_speedup": 1 / decode_ratio,
            "attn_proj_fraction_saved": savings.get("attn_proj_fraction_saved"),
            "qk_flops_saved_per_token": nf * 2 * qk_params, "all_flops_per_token_prefill": prefill_flops,
            "decode_bytes_saved_per_step": saved, "decode_bytes_read_per_step": weight_bytes + kv_bytes}


# ----- checks and measurements ------------------------------------------------------------------------------------
def sanity(loaded: LoadedModel, plan: SharePlan, length: int) -> dict:
    """Fast vs exact logits on one short random sequence, and a short generate() under the patch."""
    model = loaded.model
    ids = torch.randint(0, loaded.info.vocab_size, (1, length), device=model.device)
    with torch.inference_mode():
        base = model(input_ids=ids).logits.float()
        with share_attention(model, plan, mode="fast"):
            fast = model(input_ids=ids).logits.float()
            generated = model.generate(ids[:, :16], max_new_tokens=8, do_sample=False, pad_token_id=0,
                                       attention_mask=torch.ones_like(ids[:, :16]))
        with share_attention(model, plan, mode="exact"):
            exact = model(input_ids=ids).logits.float()
    scale = float(exact.abs().max())
    return {"length": length, "fast_vs_exact_max_abs": float((fast - exact).abs().max()), "logit_scale": scale,
            "patched_vs_baseline_max_abs": float((fast - base).abs().max()), "generate_new_tokens": generated.shape[1] - 16}


def measure(loaded: LoadedModel, plan: SharePlan, batch: int, length: int, n_new: int, warmup: int, repeats: int, mode: str) -> dict:
    prompt = torch.randint(0, loaded.info.vocab_size, (batch, length), generator=torch.Generator().manual_seed(batch))
    return compare_speed(loaded.model, plan, prompt, mode=mode, n_new=n_new, warmup=warmup, repeats=repeats)


# ----- output ---------------------------------------------------------------------------------------------------
def fmt_bytes(value) -> str:
    return "-" if value is None else f"{value / GIB:.3f} GiB" if value >= GIB / 10 else f"{value / 1024**2:.2f} MiB"


def table(rows: list[tuple]) -> str:
    header = ("measurement", "baseline", "patched", "patched / baseline", "predicted")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def rows_for(name: str, result: dict, pred: dict, kind: str) -> list[tuple]:
    b, p, r = result["baseline"], result["patched"], result["ratio"]
    out = []
    if kind == "prefill":
        out.append((f"{name} prefill tokens/s", f"{b['prefill_tokens_per_s']:,.0f}", f"{p['prefill_tokens_per_s']:,.0f}",
                    f"{r['prefill_tokens_per_s']:.3f}", f"{pred['prefill_speedup']:.3f}"))
    else:
        out.append((f"{name} decode tokens/s", f"{b['decode_tokens_per_s']:,.1f}", f"{p['decode_tokens_per_s']:,.1f}",
                    f"{r['decode_tokens_per_s']:.3f}", f"{pred['decode_speedup']:.3f}"))
    out.append((f"{name} KV-cache bytes (after prefill)", fmt_bytes(b["kv_cache_bytes"]), fmt_bytes(p["kv_cache_bytes"]),
                f"{r['kv_cache_bytes']:.3f}", f"{pred['kv_bytes_ratio']:.3f}"))
    peak = r["peak_memory_bytes"]
    out.append((f"{name} peak memory", fmt_bytes(b["peak_memory_bytes"]), fmt_bytes(p["peak_memory_bytes"]),
                "-" if peak is None else f"{peak:.3f}", ""))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny 32-layer shape on the CPU (smoke test)")
    parser.add_argument("--model", default="llama2-7b", help="alias built with random weights (default llama2-7b)")
    parser.add_argument("--spans", default="23-30", help="followers, e.g. 23-30 (default: 8 of 32 layers, anchor 22)")
    parser.add_argument("--mode", default="fast", choices=("fast", "exact", "infer"), help="the patch's mode (infer: prefill as fast, decode steps reuse the anchor's row)")
    parser.add_argument("--prefill-len", type=int, default=None, help="prefill tokens (default 4096; tiny 128)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt before decoding (default 2048; tiny 64)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decoded tokens (default 256; tiny 8)")
    parser.add_argument("--batches", default=None, help="decode batch sizes (default 1,8; tiny 1,2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_patch.json")
    args = parser.parse_args(argv)

    tiny = args.tiny
    prefill_len = args.prefill_len or (128 if tiny else 4096)
    prompt_len = args.prompt_len or (64 if tiny else 2048)
    n_new = args.new_tokens or (8 if tiny else 256)
    batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,8")).split(",")]
    if not tiny and not torch.cuda.is_available():
        print("No CUDA device: run with --tiny for the CPU smoke test.", file=sys.stderr)
        return 2

    log("building", "tiny 32-layer llama (CPU)" if tiny else f"{args.model} with random bf16 weights")
    loaded = tiny_loaded("cpu") if tiny else load_model(args.model, random_init=True, dtype="bfloat16", device="cuda")
    info = loaded.info
    plan = SharePlan.from_spans(args.spans, info.n_layers, model={"name": info.name, "n_layers": info.n_layers,
                                "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads, "head_dim": info.head_dim,
                                "hidden_size": info.hidden_size})
    log("plan:", plan.summary(), f"mode={args.mode}")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not tiny else "cpu"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name,
              "model": info.to_dict(), "plan": plan.to_dict(), "mode": args.mode, "torch": torch.__version__}

    result["sanity"] = sanity(loaded, plan, min(512, prefill_len))
    log("sanity:", result["sanity"])

    rows = []
    log(f"prefill: batch 1 x {prefill_len}")
    pre = measure(loaded, plan, 1, prefill_len, 0, args.warmup, args.repeats, args.mode)
    pred = predictions(loaded, plan, prefill_len, prompt_len, n_new, 1)
    result["prefill"] = {"result": pre, "predicted": pred}
    rows += rows_for(f"batch 1 x {prefill_len}", pre, pred, "prefill")
    for batch in batches:
        log(f"decode: batch {batch}, {n_new} tokens after {prompt_len}")
        dec = measure(loaded, plan, batch, prompt_len, n_new, args.warmup, args.repeats, args.mode)
        pred = predictions(loaded, plan, prefill_len, prompt_len, n_new, batch)
        result[f"decode_b{batch}"] = {"result": dec, "predicted": pred}
        rows += rows_for(f"batch {batch}, {prompt_len}+{n_new}", dec, pred, "decode")
        if torch.cuda.is_available() and not tiny:
            torch.cuda.empty_cache()

    text = table(rows)
    print()
    print(f"{info.name}, {plan.summary()}, {args.mode} mode, {device_name}, {result['date']}")
    print(text)
    print(f"\npredicted Q/K projection share of attention projections: {pred['attn_proj_fraction_saved']:.3f}; "
          f"Q/K FLOPs saved per token {pred['qk_flops_saved_per_token']:.3g} of {pred['all_flops_per_token_prefill']:.3g}")
    result["table"] = text
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "bench_patch.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        log("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
