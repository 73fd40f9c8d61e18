"""What a streaming run costs in time: its Gram products in floating-point operations, timed against the matrix
products this device actually runs, so that `--rows auto` can tell when all rows would take too long."""

from __future__ import annotations

import functools
import time

import torch

from .products import mm32
from .memory import default_operand_dtype

# metrics time (after the forward) over the Gram products' flops at the measured product rate, per device type:
# CUDA, an H200 at Llama-2-7B shape and 4096 tokens: 114 ms of metrics, 64 ms of them products (row statistics 7,
# Triton operand emission 43; BENCHMARKS.md); CPU, the default model at 1024 and 2048 tokens on 2 cores: 4.2 and
# 16.5 s against 0.66 and 2.6 s of products (the plain-torch operands, elementwise, dominate there)
METRICS_OVER_GRAM = {"cuda": 1.8, "cpu": 6.3}
# per (row, key) element, in units of N^2: X [X; Y]^T and Xr Xr^T on the upper block-triangle of 2 row chunks
# (1.75 + 0.75; the exact triangle would be 1.5 + 0.5)
GRAM_MACS_PER_ELEMENT = 2.5


def gram_flops(n_pairs_side: int, elements: float) -> float:
    """Floating-point operations of the engine's Gram products: N = layers x heads, over `elements` (row, key) pairs."""
    return 2.0 * GRAM_MACS_PER_ELEMENT * n_pairs_side**2 * elements


def causal_elements(n: int, exclude_first: int = 0) -> float:
    """(row, key) pairs the statistics of all rows of an n-token sequence sum over (keys from exclude_first)."""
    rows = n - exclude_first
    return rows * (rows + 1) / 2


@functools.cache
def matmul_rate(device: str) -> float:
    """Floating-point operations per second of an operand-dtype matrix product (fp32 result) of the engine's shape on
    `device`, measured once per process (about a tenth of a second)."""
    dev = torch.device(device)
    dtype = default_operand_dtype(dev)
    n, k = (1024, 16384) if dev.type == "cuda" else (256, 4096)
    a = torch.rand(n, k, device=dev).to(dtype)
    b = torch.rand(k, 2 * n, device=dev).to(dtype)

    def run() -> None:
        mm32(a, b, torch.float32)  # the engine's product: low-precision operands, fp32 result
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    run()
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 0.05:
        run()
        reps += 1
    return 2.0 * n * k * 2 * n * reps / (time.perf_counter() - start)


def predicted_seconds(n_layers: int, n_heads: int, n: int, exclude_first: int, device: str,
                      rows: int | None = None) -> float:
    """Predicted seconds of the streamed statistics (after the forward) of one sequence, over all rows or over `rows`
    stratified rows (which see half the keys on average)."""
    N = n_layers * n_heads
    elements = causal_elements(n, exclude_first) if rows is None else rows * (n - exclude_first) / 2
    overhead = METRICS_OVER_GRAM.get(torch.device(device).type, METRICS_OVER_GRAM["cpu"])
    return overhead * gram_flops(N, elements) / matmul_rate(str(device))
