#!/usr/bin/env python
"""Naive attention maps vs the streaming engine, side by side in one process on one GPU; prints a table of ratios.

    python benchmarks/bench_streaming.py --out results/           # everything (about 3 minutes on an H100)
    python benchmarks/bench_streaming.py --lengths 4096 --sweep    # 4096 tokens, with a sweep of engine settings

Sections: (1) correctness on small bf16 models against float64 maps, (2) the Gram products alone at the engine's
unit size, (3) a Llama-2-7B-shaped model with random weights (`--random-init`, no download): bare SDPA forward,
naive eager forward with `output_attentions=True`, the streaming engine (forward + all metrics) with a breakdown,
the sampled mode (one row in `--sample-every`) and the arithmetic floor, an optional sweep of engine settings, then
longer contexts; (4) with `--long-model llama3.1-8b`: `--long-n` tokens from sampled rows end to end, and at
`--plan-n` tokens the plans from all rows and from sampled rows side by side.
Times are medians of CUDA-event timings after a warm-up; memory is the peak allocated above what was allocated
before the call (model weights excluded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback

import torch

GIB = 1024**3
T0 = time.time()


def log(*args):
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def timed(fn, warmup=1, reps=3):
    """(median ms, last result) with CUDA events."""
    out = None
    for _ in range(warmup):
        out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), out


def peak_extra(fn):
    """(peak bytes allocated above the starting point, result)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----- (1) correctness -------------------------------------------------------------------------------------------
def correctness(results: dict, quick: bool = False) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sa_analysis.capture import AttentionMaps, capture_attention
    from sa_analysis.metrics import sequence_stats_from_maps
    from sa_analysis.streaming import stream_sequence_stats

    configs = {
        "llama-gqa": dict(model_type="llama", num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                          num_key_value_heads=2, intermediate_size=1024, vocab_size=1000),
        "mistral-sw256": dict(model_type="mistral", num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                              num_key_value_heads=2, intermediate_size=1024, vocab_size=1000, sliding_window=256),
        "gemma2-cap-sw": dict(model_type="gemma2", num_hidden_layers=4, hidden_size=512, num_attention_heads=8,
                              num_key_value_heads=4, head_dim=64, intermediate_size=1024, vocab_size=1000,
                              sliding_window=256, attn_logit_softcapping=50.0, query_pre_attn_scalar=64),
    }
    n = 1024
    rows = []
    if quick:
        configs = {k: v for k, v in configs.items() if k == "gemma2-cap-sw"}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).to("cuda", torch.bfloat16).eval()
        model.set_attn_implementation("eager" if "gemma2" in name else "sdpa")
        with torch.no_grad():
            for m in model.modules():
                if type(m).__name__.endswith("Attention"):
                    m.q_proj.weight.mul_(6.0)  # peakier maps than random weights give
        ids = torch.randint(0, 1000, (1, n), device="cuda")
        for excl in ((4,) if quick else (0, 4)):
            maps = AttentionMaps(dtype=torch.float64)
            with torch.no_grad(), capture_attention(model, maps):
                model(ids, use_cache=False)
            lp = torch.stack([maps.log_probs[i][0] for i in range(cfg["num_hidden_layers"])])
            del maps
            ref = sequence_stats_from_maps(lp, exclude_first=excl, block=256)
            del lp
            for op in ((None, torch.bfloat16) if quick else (None, torch.bfloat16, torch.float32)):
                got, _ = stream_sequence_stats(model, ids, exclude_first=excl, operand_dtype=op)
                err = {}
                for f in ("cosine_flat", "cosine_row", "kl", "entropy", "js_adjacent"):
                    a, b = getattr(got, f).double(), getattr(ref, f).double()
                    same_inf = bool(torch.equal(torch.isinf(a), torch.isinf(b)))
                    fin = torch.isfinite(b)
                    err[f] = float((a[fin] - b[fin]).abs().max()) if same_inf else float("nan")
                worst = max(err.values())
                row = dict(model=name, exclude_first=excl, operands=str(op or "default(fp16)").replace("torch.", ""),
                           n=n, **{k: f"{v:.1e}" for k, v in err.items()}, ok=bool(worst <= 1e-3))
                rows.append(row)
                log("correctness", row)
        del model
        torch.cuda.empty_cache()
    results["correctness"] = rows


# ----- (2) Gram products -----------------------------------------------------------------------------------------
def gemm_bench(results: dict, N=1024, M=131072) -> None:
    from sa_analysis.streaming import engine as S

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    U = (torch.rand(3, N, M, device="cuda", generator=g) * 100).half()
    flops = 3 * 2 * N * N * M  # three full Grams' worth of useful work
    for gram, chunks in [("full", 1), ("tri", 2), ("tri", 4), ("tri", 8), ("splitk", 2), ("splitk", 4)]:
        st = type("St", (), {})()
        st.rows = slice(0, N)
        st.acc_xy = torch.zeros(1, N, 2 * N, device="cuda")  # [parts, rows, 2N]
        st.acc_r = torch.zeros(1, N, N, device="cuda")
        st.acc_s = None
        eng = type("E", (), {})()
        eng.N, eng.gram, eng.tri_chunks, eng.acc_dtype = N, gram, chunks, torch.float32
        ms, _ = timed(lambda: S.StreamingStatistics._accumulate(eng, st, U, 0), warmup=2, reps=10)
        rows.append(dict(gram=f"{gram}{chunks}", ms=round(ms, 3), tflops_equiv=round(flops / ms / 1e9, 1)))
        log("gemm", rows[-1])
    mm_ok = S._MM_DTYPE_OK
    results["gemm"] = dict(N=N, M=M, rows=rows, mm_out_dtype_ok=mm_ok)
    U = None  # free before the model loads
    torch.cuda.empty_cache()


# ----- (3) the big model ------------------------------------------------------------------------------------------
def big_model(results: dict, args) -> None:
    from sa_analysis.capture import capture_attention
    from sa_analysis.loading import load_model
    from sa_analysis.streaming import QKStore, StreamingStatistics, check_fits, stream_sequence_stats

    log("loading", args.model, "random-init bf16")
    loaded = load_model(args.model, random_init=True, dtype="bfloat16", device="cuda")
    model, info = loaded.model, loaded.info
    results["model"] = dict(name=info.name, layers=info.n_layers, heads=info.n_heads, kv_heads=info.n_kv_heads,
                            head_dim=info.head_dim, weights_gib=round(torch.cuda.memory_allocated() / GIB, 2))
    table = []
    opts: dict = {}
    for n in args.lengths:
        if time.time() - T0 > args.budget_s:
            log("time budget spent; skipping", n)
            break
        row: dict = dict(n=n)
        ids = torch.randint(0, info.vocab_size, (1, n), device="cuda")
        try:
            plan = check_fits(info, n, "cuda")
            row["plan"] = plan.describe()
        except Exception as exc:  # noqa: BLE001
            row["plan"] = f"refused: {exc}"
            table.append(row)
            log(row)
            continue
        long = n > 8192
        reps = 1 if long else 3
        if args.sweep and n == args.lengths[0]:
            store = QKStore.for_model(model)
            with torch.no_grad(), capture_attention(model, store):
                model(ids, use_cache=False, logits_to_keep=1)
            store.finish()
            results["sweep"], opts = sweep(store, deadline=args.budget_s * 0.55)
            results["engine_options"] = {k: str(v) for k, v in opts.items()}
            del store
            torch.cuda.empty_cache()
        # bare SDPA forward
        with torch.no_grad():
            try:
                mem, _ = peak_extra(lambda: model(ids, use_cache=False).logits.shape)
                row["sdpa_ms"], _ = timed(lambda: model(ids, use_cache=False).logits.shape, 0, reps)
                row["sdpa_gib"] = mem / GIB
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                row["sdpa_ms"] = "OOM"
            torch.cuda.empty_cache()
        # naive: eager with output_attentions
        if n <= args.naive_max:
            model.set_attn_implementation("eager")
            try:
                with torch.no_grad():
                    fn = lambda: model(ids, use_cache=False, output_attentions=True).attentions[-1].shape  # noqa: E731
                    mem, _ = peak_extra(fn)
                    row["naive_ms"], _ = timed(fn, 0, reps)
                    row["naive_gib"] = mem / GIB
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                row["naive_ms"], row["naive_gib"] = "OOM", "OOM"
            finally:
                model.set_attn_implementation("sdpa")
                torch.cuda.empty_cache()
        else:
            row["naive_ms"] = "skipped (OOM per issue)"
        # streaming: forward + all metrics
        try:
            t: dict = {}
            mem, _ = peak_extra(lambda: stream_sequence_stats(model, ids, timings=t, engine_options=opts)[0].kl.shape)
            row["stream_gib"] = mem / GIB
            row["stream_forward_ms"] = t["forward_s"] * 1e3
            row["stream_metrics_ms"] = t["metrics_s"] * 1e3
            if long:
                row["stream_ms"] = (t["forward_s"] + t["metrics_s"]) * 1e3
            else:
                row["stream_ms"], _ = timed(
                    lambda: stream_sequence_stats(model, ids, engine_options=opts)[0].kl.shape, 0, reps)
                t = {}
                stream_sequence_stats(model, ids, timings=t, engine_options=opts)
                row["stream_forward_ms"] = t["forward_s"] * 1e3
                row["stream_metrics_ms"] = t["metrics_s"] * 1e3
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                traceback.print_exc()
                row["stream_ms"] = f"error: {type(exc).__name__}: {exc}"[:300]
            else:
                row["stream_ms"] = "OOM"
        try:
            if long:
                raise StopIteration
            # breakdown with CUDA events on a captured store
            store = QKStore.for_model(model)
            with torch.no_grad(), capture_attention(model, store):
                model(ids, use_cache=False, logits_to_keep=1)
            store.finish()
            with torch.no_grad():
                eng = StreamingStatistics(store, profile=True, **opts)
                eng.run()
            row["breakdown"] = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in eng.timings.items()}
            del store, eng
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["breakdown"] = f"error: {type(exc).__name__}: {exc}"[:300]
        torch.cuda.empty_cache()
        sampled_mode(row, model, ids, n, args, opts)
        floor(row, info, n)
        if isinstance(row.get("stream_ms"), float) and isinstance(row.get("sdpa_ms"), float):
            row["stream_over_sdpa"] = row["stream_ms"] / row["sdpa_ms"]
        if isinstance(row.get("naive_ms"), float) and isinstance(row.get("stream_ms"), float):
            row["naive_over_stream"] = row["naive_ms"] / row["stream_ms"]
        table.append(row)
        log(row)
    results["lengths"] = table


def sampled_mode(row: dict, model, ids, n: int, args, opts: dict) -> None:
    """Forward + every metric estimated from `n / args.sample_every` stratified rows (16 replicates)."""
    from sa_analysis.streaming import RowSample, stream_sequence_stats

    sample = RowSample.draw(n, n // args.sample_every, replicates=16, seed=0)
    row["sampled_rows"] = sample.rows
    run = lambda: stream_sequence_stats(model, ids, sample=sample, engine_options=opts)[0]  # noqa: E731
    try:
        run()  # warm-up: the SAMPLED kernels compile on first use
        mem, stats = peak_extra(run)
        row["sampled_gib"] = mem / GIB
        row["sampled_ms"], _ = timed(lambda: run().kl.shape, 0, 1 if n > 8192 else 3)
        finite = torch.isfinite(stats.kl)
        row["sampled_kl_se_median"] = float(stats.se["kl"][finite].median())
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row["sampled_ms"] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {exc}"[:300]
    torch.cuda.empty_cache()


_PEAK: list[float] = []


def peak_rate() -> float:
    """The best fp16 matrix-product rate (fp32 result, as the engine's) this GPU reaches: 8192^3 products, median of
    10 after a warm-up."""
    if not _PEAK:
        from sa_analysis.streaming.products import mm32

        a = torch.rand(8192, 8192, device="cuda").half()
        b = torch.rand(8192, 8192, device="cuda").half()
        ms, _ = timed(lambda: mm32(a, b, torch.float32).shape, warmup=3, reps=10)
        _PEAK.append(2 * 8192**3 / (ms / 1e3))
        del a, b
        torch.cuda.empty_cache()
    return _PEAK[0]


def floor(row: dict, info, n: int) -> None:
    """The arithmetic floor: the bare forward plus the Gram products' minimum work (flat and row cosine on their exact
    upper triangle, the KL cross term in full: 4 N^2 M flops for M causal (row, key) pairs) at the best fp16
    matrix-product rate this GPU reaches (`peak_rate`)."""
    from sa_analysis.streaming.cost import causal_elements

    N = info.n_layers * info.n_heads
    rate = peak_rate()
    row["matmul_tflops"] = rate / 1e12
    row["gram_floor_tflop"] = 4 * N**2 * causal_elements(n) / 1e12
    row["gram_floor_ms"] = row["gram_floor_tflop"] * 1e12 / rate * 1e3
    if isinstance(row.get("sdpa_ms"), float):
        row["floor_ms"] = row["sdpa_ms"] + row["gram_floor_ms"]


def run_variant(store, kw: dict) -> dict:
    from sa_analysis.streaming import StreamingStatistics

    try:
        with torch.no_grad():
            ms, _ = timed(lambda: StreamingStatistics(store, **kw).run().kl.shape, 1, 2)
            eng = StreamingStatistics(store, profile=True, **kw)
            eng.run()
        row = dict(variant=kw, ms=round(ms, 2), **{k: round(v, 2) for k, v in eng.timings.items() if k.endswith("_ms")})
        for name, kernel in eng.compiled.items():
            row[name + "_regs_spills"] = (getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None))
    except Exception as exc:  # noqa: BLE001
        row = dict(variant=kw, ms=float("inf"), error=f"{type(exc).__name__}: {exc}"[:200])
    log("sweep", row)
    return row


def sweep(store, deadline: float) -> tuple[list[dict], dict]:
    """Greedy: emit tile, then row-statistics tile, then the unit size (operand memory vs product efficiency)."""
    rows: list[dict] = []
    best: dict = {}

    def pick(candidates, key):
        nonlocal best
        scored = []
        for cand in candidates:
            if time.time() - T0 > deadline:
                break
            kw = {**best, **cand}
            row = run_variant(store, kw)
            rows.append(row)
            scored.append((row.get(key, float("inf")) if "error" not in row else float("inf"), cand))
        if scored:
            best = {**best, **min(scored, key=lambda t: t[0])[1]}

    pick([dict(tile=t) for t in [(64, 64, 4), (64, 64, 4, 2), (64, 64, 4, 2, 168), (64, 64, 4, 1, 128),
                                 (128, 64, 8, 2)]], "emit_ms")
    pick([dict(stats_tile=t) for t in [(128, 64, 4), (128, 64, 8), (64, 64, 4)]], "row_stats_ms")
    pick([dict(), dict(unit_elements=262144)], "ms")
    log("best engine options", best)
    return rows, best


def print_table(results: dict) -> None:
    print("\n==== streaming vs naive, " + results["device"] + ", " + results["date"] + " ====")
    if "correctness" in results:
        bad = [r for r in results["correctness"] if not r["ok"]]
        worst = max(max(float(r[f]) for f in ("cosine_flat", "cosine_row", "kl", "entropy", "js_adjacent"))
                    for r in results["correctness"] if r["operands"] == "default(fp16)")
        models = sorted({r["model"] for r in results["correctness"]})
        print(f"correctness vs float64 maps (n=1024, bf16 models {models}): worst abs error "
              f"{worst:.1e} with default operands; {len(bad)} configurations over 1e-3")
    if "gemm" in results:
        g = results["gemm"]
        print(f"gram products per unit (N={g['N']}, M={g['M']}, fp16 -> fp32, mm out_dtype: {g['mm_out_dtype_ok']}): "
              + ", ".join(f"{r['gram']} {r['ms']} ms ({r['tflops_equiv']} TF/s eq.)" for r in g["rows"]))
    if "model" in results:
        m = results["model"]
        print(f"model {m['name']} (L={m['layers']}, H={m['heads']}, Hkv={m['kv_heads']}, d={m['head_dim']}), "
              f"weights {m['weights_gib']} GiB, batch 1, bf16")
    hdr = f"{'n':>6} | {'sdpa fwd':>9} | {'naive fwd':>10} | {'naive mem':>9} | {'stream':>9} | {'= fwd':>7} + {'metrics':>8} | {'stream mem':>10} | {'stream/sdpa':>11} | {'naive/stream':>12}"
    print(hdr)
    print("-" * len(hdr))

    def f(v, unit=""):
        return f"{v:.1f}{unit}" if isinstance(v, float) else str(v)

    for r in results.get("lengths", []):
        print(f"{r['n']:>6} | {f(r.get('sdpa_ms'), ' ms'):>9} | {f(r.get('naive_ms'), ' ms')[:10]:>10} | "
              f"{f(r.get('naive_gib'), ' GiB'):>9} | {f(r.get('stream_ms'), ' ms')[:9]:>9} | "
              f"{f(r.get('stream_forward_ms'), ''):>7} + {f(r.get('stream_metrics_ms'), ''):>8} | "
              f"{f(r.get('stream_gib'), ' GiB'):>10} | {f(r.get('stream_over_sdpa'), 'x'):>11} | "
              f"{f(r.get('naive_over_stream'), 'x'):>12}")
        if "breakdown" in r:
            print(f"{'':>6}   engine breakdown (ms): {r['breakdown']}")
    if "engine_options" in results:
        print("engine options (sweep best):", results["engine_options"])
    print("targets: 4096 tokens stream/sdpa <= 2.0x and stream mem <= 4 GiB; 32768 tokens completes; errors <= 1e-3")


def long_context(results: dict, args) -> None:
    """(4) A Llama-3.1-8B shape: `--long-n` tokens from sampled rows, timed end to end; then at `--plan-n` tokens the
    report from all rows against the report from sampled rows (whole heatmap job: `analyse`), the planner run on both,
    and how far each sampled estimate lies from the exact value in units of its standard error."""
    import gc

    import numpy as np

    from sa_analysis.data import TokenBatch
    from sa_analysis.loading import load_model
    from sa_analysis.pipeline import analyse
    from sa_analysis.planner import plan_spans
    from sa_analysis.streaming import RowSample, stream_sequence_stats
    from sa_analysis.streaming.cost import predicted_seconds

    gc.collect()
    torch.cuda.empty_cache()
    log("loading", args.long_model, "random-init bf16")
    loaded = load_model(args.long_model, random_init=True, dtype="bfloat16", device="cuda")
    model, info = loaded.model, loaded.info
    out: dict = dict(model=info.name, layers=info.n_layers, heads=info.n_heads, kv_heads=info.n_kv_heads,
                     n=args.long_n, rows=args.long_rows, runs=[])
    results["long"] = out
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, info.vocab_size, (1, args.long_n), device="cuda", generator=gen)
    sample = RowSample.draw(args.long_n, args.long_rows, replicates=16, seed=0)
    out["sampled_rows"] = sample.rows
    out["predicted_all_rows_s"] = predicted_seconds(info.n_layers, info.n_heads, args.long_n, 0, "cuda")
    for attempt in ("first run (kernels compile)", "second run"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t: dict = {}
        start = time.perf_counter()
        stats, _ = stream_sequence_stats(model, ids, sample=sample, timings=t)
        torch.cuda.synchronize()
        total = time.perf_counter() - start
        kl_se = stats.se["kl_layers"].double().cpu().numpy()  # [L, L]
        kl_layers = stats.kl.double().cpu().diagonal(dim1=1, dim2=3).mean(-1).numpy()  # [L, L] head mean
        off = ~np.eye(info.n_layers, dtype=bool)
        run = dict(attempt=attempt, total_s=total, forward_s=t["forward_s"], metrics_s=t["metrics_s"],
                   extra_gib=(torch.cuda.max_memory_allocated() - base) / GIB,
                   kl_layers_se_median=float(np.median(kl_se[off])), kl_layers_se_max=float(kl_se[off].max()),
                   kl_layers_median=float(np.median(kl_layers[off])))
        out["runs"].append(run)
        log("long", run)
        del stats
    del ids
    torch.cuda.empty_cache()
    # the planner on all rows vs sampled rows, at a length where all rows are still in reach
    ids = torch.randint(0, info.vocab_size, (1, args.plan_n), device="cuda", generator=gen)
    batch = TokenBatch(ids.cpu(), "random", "calibration", 1)
    start = time.perf_counter()
    exact = analyse(loaded, batch, path="stream", rows="all")
    exact_s = time.perf_counter() - start
    start = time.perf_counter()
    sampled = analyse(loaded, batch, path="stream", rows=args.plan_rows)
    sampled_s = time.perf_counter() - start
    check = dict(n=args.plan_n, rows=sampled.sampling["rows"], exact_s=exact_s, sampled_s=sampled_s, budgets=[])
    for name in ("kl", "cosine_flat"):
        a, b = exact.layer_matrix(name), sampled.layer_matrix(name)
        se = sampled.layer_matrix_se(name)
        off = ~np.eye(a.shape[0], dtype=bool) & np.isfinite(a) & (se > 0)
        z = (b[off] - a[off]) / se[off]
        check[f"{name}_within_2se"] = float((np.abs(z) < 2).mean())
        check[f"{name}_abs_z_median"] = float(np.median(np.abs(z)))
        check[f"{name}_se_median"] = float(np.median(se[off]))
    for budget in (4, 8, 12):
        pe = plan_spans(exact, budget=budget, stability_resamples=0)
        ps = plan_spans(sampled, budget=budget, stability_resamples=0)
        same = (pe.followers == ps.followers and pe.anchor_of == ps.anchor_of and pe.head_map == ps.head_map)
        entry = dict(budget=budget, same=bool(same), exact_followers=pe.followers, sampled_followers=ps.followers,
                     exact_cost=sum(pe.follower_costs.values()), sampled_cost=sum(ps.follower_costs.values()),
                     aligned_exact=sorted(pe.head_map), aligned_sampled=sorted(ps.head_map))
        check["budgets"].append(entry)
        log("plan", entry)
    out["plan_check"] = check


def print_long(results: dict) -> None:
    if "long" not in results:
        return
    r = results["long"]
    print(f"\nlong context: {r['model']} (L={r['layers']}, H={r['heads']}, Hkv={r['kv_heads']}), {r['n']} tokens, "
          f"{r.get('sampled_rows')} sampled rows (16 replicates); all rows predicted {r['predicted_all_rows_s']:.0f} s")
    for run in r["runs"]:
        print(f"  {run['attempt']:<28} total {run['total_s']:.1f} s = forward {run['forward_s']:.1f} + metrics "
              f"{run['metrics_s']:.1f}; extra memory {run['extra_gib']:.1f} GiB; KL (head mean) median "
              f"{run['kl_layers_median']:.4f}, its standard error median {run['kl_layers_se_median']:.2e}, "
              f"max {run['kl_layers_se_max']:.2e}")
    c = r.get("plan_check")
    if c:
        print(f"  planner at {c['n']} tokens: all rows {c['exact_s']:.1f} s vs {c['rows']} sampled rows "
              f"{c['sampled_s']:.1f} s (whole heatmap job); sampled estimates within 2 SE of the exact value: KL "
              f"{100 * c['kl_within_2se']:.0f} %, cosine {100 * c['cosine_flat_within_2se']:.0f} %")
        for b in c["budgets"]:
            print(f"    budget {b['budget']:>2}: {'same plan' if b['same'] else 'DIFFERENT plan'}; all rows "
                  f"{b['exact_followers']} (cost {b['exact_cost']:.4f}), sampled {b['sampled_followers']} "
                  f"(cost {b['sampled_cost']:.4f})")


def print_methods(results: dict) -> None:
    """One table per length: every method with its time, extra memory and ratio to the bare forward."""
    for r in results.get("lengths", []):
        fwd = r.get("sdpa_ms")
        print(f"\n{r['n']} tokens ({results['model']['name']}, batch 1, bf16)")
        print(f"  {'method':<44} | {'time':>10} | {'extra memory':>12} | {'/ forward':>9}")
        methods = [
            ("bare SDPA forward", r.get("sdpa_ms"), r.get("sdpa_gib")),
            ("naive eager forward, output_attentions", r.get("naive_ms"), r.get("naive_gib")),
            ("streaming engine, all rows (forward + metrics)", r.get("stream_ms"), r.get("stream_gib")),
            ("fused engine", "not built (see BENCHMARKS.md)", None),
            (f"sampled, {r.get('sampled_rows', '?')} rows (forward + metrics)", r.get("sampled_ms"), r.get("sampled_gib")),
            (f"arithmetic floor (forward + {r.get('gram_floor_tflop', 0):.0f} TFLOP at "
             f"{r.get('matmul_tflops', 0):.0f} TFLOP/s)", r.get("floor_ms"), None),
        ]
        for name, ms, gib in methods:
            t = f"{ms:.1f} ms" if isinstance(ms, float) and ms < 10000 else (f"{ms / 1e3:.2f} s" if isinstance(ms, float) else str(ms))
            g = f"{gib:.2f} GiB" if isinstance(gib, float) else ("" if gib is None else str(gib))
            ratio = f"{ms / fwd:.2f}x" if isinstance(ms, float) and isinstance(fwd, float) else ""
            print(f"  {name:<44} | {t[:30]:>10} | {g:>12} | {ratio:>9}")
        if "sampled_kl_se_median" in r:
            print(f"  sampled: median standard error of KL entries {r['sampled_kl_se_median']:.2e} nats")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 32768], help="none: skip section (3)")
    parser.add_argument("--naive-max", type=int, default=4096, help="longest length for the naive eager forward")
    parser.add_argument("--sweep", action="store_true", help="greedy sweep of engine settings at the first length")
    parser.add_argument("--no-correctness", dest="correctness", action="store_false")
    parser.add_argument("--quick-correctness", action="store_true", help="one small model, exclude_first=4")
    parser.add_argument("--no-gemm", dest="gemm", action="store_false")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip later lengths after this many seconds")
    parser.add_argument("--sample-every", type=int, default=8, help="the sampled mode keeps one row in this many")
    parser.add_argument("--long-model", default=None, help="a model for the long-context section (llama3.1-8b)")
    parser.add_argument("--long-n", type=int, default=131072, help="tokens of the sampled long-context run")
    parser.add_argument("--long-rows", type=int, default=16384, help="sampled rows of the long-context run")
    parser.add_argument("--plan-n", type=int, default=32768, help="length of the exact-vs-sampled planner check")
    parser.add_argument("--plan-rows", type=int, default=4096, help="sampled rows of the planner check")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_streaming.py needs a CUDA GPU")
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results: dict = dict(
        device=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
    )
    log(results)
    try:
        if args.correctness:
            correctness(results, quick=args.quick_correctness)
        if args.gemm:
            gemm_bench(results)
        if args.lengths:
            big_model(results, args)
        if args.long_model:
            long_context(results, args)
    finally:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_streaming.json"), "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        print_table(results)
        print_methods(results)
        print_long(results)


if __name__ == "__main__":
    main()
