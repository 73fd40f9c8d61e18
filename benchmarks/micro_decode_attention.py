#!/usr/bin/env python
"""One decode step's attention, kernel by kernel: what the unpatched model runs (SDPA over a static cache with its
mask) against what the inference path runs for an anchor (its softmax row, then its output from it) and for a
follower (the row times its own values), each compiled with CUDA graphs (`mode="reduce-overhead"`), as transformers'
compiled static-cache step runs them.

    PYTHONPATH=. python benchmarks/micro_decode_attention.py --out results/micro.json

Per cell (batch x context, query heads / key-value heads): microseconds per layer (median of rounds, CUDA events,
over `--layers` distinct caches so nothing stays in L2), and the bytes a layer reads divided by that time (GB/s): K
and V for SDPA, V alone for a follower. The anchor and follower columns are the inference path before the split-key
kernels (batched matmuls: cuBLAS matrix-vector products) and now (`patch.kernels`); `--programs-per-sm` also times the
follower kernel at other splits of the keys. `sdpa cudnn` asks for cuDNN's kernel, the one the compiled model runs.
Read the long contexts with care: on the H100 (2026-12-08) at 32k context the Triton columns here read at about
1.0 TB/s, where the same kernels inside the compiled model's step run at 2.9-3.0 TB/s (`profile_decode.py --cell
3x32768`; the follower column reads 2.6 TB/s at 8 x 2k). Until that is understood, the profile is the measure at
long contexts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis.capture import AttentionInputs  # noqa: E402
from sa_analysis.patch import kernels  # noqa: E402
from sa_analysis.patch.decode import attend, decode_probs  # noqa: E402


def make_layers(n_layers, batch, heads, kv_heads, context, dim, slack=64):
    """Per layer: query [B, Hq, 1, D], key/value [B, Hkv, K, D] (K = context + slack, a static cache), mask."""
    n_keys = context + slack
    mask = torch.zeros(batch, 1, 1, n_keys, dtype=torch.bool, device="cuda")
    mask[..., : context + 1] = True  # [B, 1, 1, K]: the filled part of the static cache
    layers = []
    for _ in range(n_layers):
        q = torch.randn(batch, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, n_keys, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, kv_heads, n_keys, dim, device="cuda", dtype=torch.bfloat16)
        layers.append((q, k, v))
    return layers, mask


def inputs_of(q, k, mask):
    return AttentionInputs(layer_idx=0, query=q, key=k, mask=mask, scaling=q.shape[-1] ** -0.5, softcap=None, sliding_window=None)


def sdpa(q, k, v, mask):
    """What transformers' SDPA function runs at a decode step (keys and values expanded for GQA as it does)."""
    groups = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=q.shape[-1] ** -0.5, enable_gqa=groups > 1)


def sdpa_cudnn(q, k, v, mask):
    """SDPA on cuDNN's attention, the kernel transformers' compiled static-cache step ran in the model on the H100
    (`profile_decode.py`, 2026-12-07: ~2.8 TB/s where the default dispatch here reached ~0.95 TB/s)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return sdpa(q, k, v, mask)


def anchor_row(q, k, v, mask):
    """The inference path's anchor: the row (patch.decode.decode_probs), then its own output from it; on the GPU both
    products run as the split-key Triton kernels of `patch.kernels`."""
    probs = decode_probs(inputs_of(q, k, mask))
    return attend(probs, v), probs


def anchor_row_matmul(q, k, v, mask):
    """The anchor before the kernels (2026-12-07, second session): float32 scores by a batched matmul from the bf16
    operands (cuBLAS gemv), softmax, bf16 matmul of the row with V."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    grouped = q.reshape(b * hkv, h // hkv, d)
    scores = torch.bmm(grouped, k.reshape(b * hkv, -1, d).transpose(1, 2), out_dtype=torch.float32)
    scores = scores.view(b, hkv, h // hkv, -1) * d ** -0.5  # [B, Hkv, G, K]
    probs = torch.softmax(scores.masked_fill(~mask.reshape(b, 1, 1, -1), float("-inf")), dim=-1)
    return follower_matmul(probs.reshape(b, h, 1, -1), v), probs


def follower(probs, v):
    """The inference path's follower: the anchor's row times its own values (`patch.decode.attend`)."""
    return attend(probs, v)


def follower_matmul(probs, v):
    """The follower before the kernels: the row cast to bf16 times the values as a batched matmul (cuBLAS gemv)."""
    b, h, _, k = probs.shape
    hkv = v.shape[1]
    out = torch.matmul(probs.reshape(b, hkv, h // hkv, k).to(v.dtype), v)  # [B, Hkv, G, D]
    return out.reshape(b, h, 1, -1).transpose(1, 2)


ANCHORS = {"sdpa (unpatched)": sdpa, "sdpa cudnn": sdpa_cudnn, "anchor matmul (before)": anchor_row_matmul,
           "anchor triton, a tile a program": anchor_row, "anchor triton (now)": anchor_row}
# settings of `patch.kernels` an anchor column runs under (read when the step is traced, so set outside it): the
# scores kernel as in the third session, one program per tile of 64 keys
ANCHOR_SETTINGS = {"anchor triton, a tile a program": {"SCORES_PROGRAMS_PER_SM": 10 ** 9}}
FOLLOWERS = {"follower matmul (before)": follower_matmul, "follower triton (now)": follower}


def time_per_layer(fn, layers, mask, rounds=7, calls=20) -> float:
    """Microseconds per layer of `fn` compiled with CUDA graphs, over all layers in one captured call. The tensors are
    marked static addresses, as transformers marks its static cache, so that a replay need not copy them into the
    graph's own buffers (H100, 2026-12-08, 3 x 32k: the cuDNN column fell from 1586 to 518 us with them marked; the
    other columns did not move)."""
    for tensor in (mask, *(t for layer in layers for t in layer if t is not None)):
        torch._dynamo.mark_static_address(tensor)

    def step():
        return [fn(q, k, v, mask) for q, k, v in layers]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        compiled()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            compiled()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls / len(layers))
    return statistics.median(times)


def follower_config(spec: str):
    """The row-values kernel launched as `spec` says: "programs per SM/keys per tile/warps/stages", e.g. "4/64/4/3"."""
    per_sm, block, warps, stages = (int(x) for x in spec.split("/"))
    return kernels.settings(PROGRAMS_PER_SM=per_sm, BLOCK_KEYS=block, NUM_WARPS=warps, NUM_STAGES=stages)


def follower_times(layers, mask, configs=()) -> dict[str, float]:
    """Microseconds per layer of the follower before (matmuls) and now (the kernel), and of the kernel launched as
    each of `configs` says (`follower_config`), each launch checked against the matmuls."""
    probs = [decode_probs(inputs_of(q, k, mask)) for q, k, _ in layers]
    pairs = [(p, None, v) for p, (_, _, v) in zip(probs, layers)]
    reference = follower_matmul(probs[0], layers[0][2]).float()

    def check(launch: str) -> None:
        error = (follower(probs[0], layers[0][2]).float() - reference).abs().max().item()
        assert error < 5e-2, f"the kernel ({launch}) differs from the matmul by {error}"

    found = {}
    for name, fn in FOLLOWERS.items():
        found[name] = time_per_layer(lambda p, _k, v, _m, fn=fn: fn(p, v), pairs, mask)
        torch._dynamo.reset()
    for spec in configs:
        with follower_config(spec):
            found[f"follower triton {spec}"] = time_per_layer(lambda p, _k, v, _m: follower(p, v), pairs, mask)
            check(spec)
        torch._dynamo.reset()
    check("the library's launch")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="1x2048,8x2048,32x2048,1x8192,8x8192,1x32768,3x32768")
    parser.add_argument("--shapes", default="32/32,32/8", help="query heads / key-value heads (Llama-2-7B, Llama-3.1-8B)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--programs-per-sm", default="", help="also time the follower kernel at these splits, e.g. 2,8,16")
    parser.add_argument("--follower-configs", default="",
                        help="also time the follower kernel launched so: per SM/keys per tile/warps/stages, e.g. 4/128/8/4")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    # "now": the inference path with the kernels, whatever the library's default; in eager calls too, so that the
    # checks of each launch against the matmuls (run eagerly) compare the kernel, not the matmuls with themselves
    kernels.ENABLED = kernels.IN_EAGER = True
    splits = [f"{x}/{kernels.BLOCK_KEYS}/{kernels.NUM_WARPS}/{kernels.NUM_STAGES}" for x in args.programs_per_sm.split(",") if x]
    configs = splits + [c for c in args.follower_configs.split(",") if c]  # --programs-per-sm: the library's launch otherwise
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        heads, kv_heads = (int(x) for x in shape.split("/"))
        for cell in args.cells.split(","):
            batch, context = (int(x) for x in cell.split("x"))
            layers, mask = make_layers(args.layers, batch, heads, kv_heads, context, 128)
            kv_bytes = 2 * layers[0][1].numel() * 2
            row = {"heads": heads, "kv_heads": kv_heads, "batch": batch, "context": context}
            for name, fn in ANCHORS.items():
                with kernels.settings(**ANCHOR_SETTINGS.get(name, {})):
                    row[name] = time_per_layer(fn, layers, mask)
                torch._dynamo.reset()
            row.update(follower_times(layers, mask, configs))
            row["sdpa cudnn GB/s"] = kv_bytes / row["sdpa cudnn"] / 1e3
            row["follower triton GB/s"] = kv_bytes / 2 / row["follower triton (now)"] / 1e3
            rows.append(row)
            print(" | ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            del layers
    names = [n for n in rows[0] if n not in ("heads", "kv_heads", "batch", "context") and not n.endswith("GB/s")]
    print("\n| Hq/Hkv | batch x context | " + " | ".join(f"{n} us" for n in names) + " | sdpa cudnn GB/s | follower triton GB/s (V only) |")
    print("|---" * (len(names) + 4) + "|")
    for row in rows:
        cells = " | ".join(f"{row[n]:.1f}" for n in names)
        print(f"| {row['heads']}/{row['kv_heads']} | {row['batch']}x{row['context']} | {cells} | "
              f"{row['sdpa cudnn GB/s']:.0f} | {row['follower triton GB/s']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
