"""The inference path's decode kernels (Triton, CUDA only): an anchor's scores and the row times values, each split
over keys so that a decode step reads the keys (scores) or the values (row times values) once, at the GPU's bandwidth.

Why: at a decode step the unpatched model runs a fused flash-decoding kernel over K and V (cuDNN on an H100, about
2.8 TB/s); the batched matmuls that form the row [B, Hkv, G, K] x V [B, Hkv, K, D] run as cuBLAS matrix-vector
products with one block per (sequence, head), about 1.5 TB/s (BENCHMARKS.md, 2026-12-07), so a follower that reads
half the bytes saved only a tenth of the time. Splitting the keys over many programs (flash-decoding's split-K) keeps
every SM reading.

Both kernels are registered as `torch.library.triton_op`s, so transformers' compiled static-cache step traces them
into its graph (no graph break, captured by CUDA graphs). `usable()` says whether a call takes them (CUDA tensors of
half precision, Triton and `triton_op` present, a compiled step: eager decoding keeps the matmuls, `IN_EAGER`);
`patch.decode` runs batched matmuls elsewhere, which are also the reference the GPU tests compare against.

Shapes, grouped as `patch.decode` groups them (query head h reads key/value head h // G):
    query [B, Hkv, G, D], keys [B, Hkv, K, D] -> scores [B, Hkv, G, K] float32
    row [B, Hkv, G, K] (float32), values [B, Hkv, K, D] -> output [B, Hkv, G, D] in the values' dtype
"""

from __future__ import annotations

import contextlib
import functools

import torch

BLOCK_KEYS = 64  # keys per tile: one tl.dot of [G_PAD, D] x [D, 64] (scores) or [G_PAD, 64] x [64, D] (row x values)
# True: the inference path's decode steps run the kernels on CUDA (H100, 2026-12-07: against float64 and the batched
# matmuls in tests/test_decode_kernels.py; compiled decode of the Llama-2-7B shape 1.092x at batch 8, 2k, BENCHMARKS.md);
# False: batched matmuls everywhere (the reference the GPU tests and benchmarks compare against).
ENABLED = True
# False: eager decoding (no compiled step) runs the batched matmuls, where launching a Triton kernel from Python costs
# more than its bandwidth saves (H100, 2026-12-07, Llama-2-7B shape, eager decode at 2k: 25.81 / 28.36 ms a step at
# batch 1 / 8 with the kernels, 24.61 / 24.56 with the matmuls); inside a compiled step the launch costs nothing.
IN_EAGER = False
UNAVAILABLE: str | None = None  # why the kernels could not be registered, where they could not
PROGRAMS_PER_SM = 4  # split the keys until about this many programs per SM run (tuned on the H100: micro_decode_attention.py)
# the scores kernel: programs per SM (each scores a range of keys, tile by tile; 10**9: one tile of keys a program,
# as before 2026-12-07's fourth session). 4 as for the row values, not tuned yet (micro_decode_attention.py times both)
SCORES_PROGRAMS_PER_SM = 4
NUM_WARPS, NUM_STAGES = 4, 3  # the row-values kernel's launch (Triton's defaults; micro_decode_attention.py --follower-configs)


def _register():
    """(scores op, row-values op), registered once at import, or None where Triton or `torch.library.triton_op`
    (torch >= 2.6) is missing or Triton fails to import (`UNAVAILABLE` says why): the library must import on any
    machine. At import, not on first use: the compiled step must find them as constants."""
    global UNAVAILABLE
    try:
        from torch.library import triton_op, wrap_triton

        from . import _triton_decode as kernels
    except Exception as exc:  # noqa: BLE001 - an optional accelerator path; the batched matmuls serve instead
        UNAVAILABLE = f"{type(exc).__name__}: {exc}"
        return None

    @triton_op("sa_analysis::decode_scores", mutates_args=())
    def decode_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        batch, n_kv, n_keys, _ = key.shape
        split = keys_per_program(batch * n_kv, n_keys, key.device, SCORES_PROGRAMS_PER_SM)
        return kernels.scores(query, key, wrap_triton(kernels.scores_kernel), BLOCK_KEYS, split)

    @triton_op("sa_analysis::decode_row_values", mutates_args=())
    def decode_row_values(row: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, n_kv, n_keys, _ = value.shape
        split = keys_per_program(batch * n_kv, n_keys, value.device)
        return kernels.row_values(row, value, wrap_triton(kernels.row_values_kernel), BLOCK_KEYS, split,
                                  num_warps=NUM_WARPS, num_stages=NUM_STAGES)

    return decode_scores, decode_row_values


SETTINGS = ("ENABLED", "IN_EAGER", "PROGRAMS_PER_SM", "SCORES_PROGRAMS_PER_SM", "BLOCK_KEYS", "NUM_WARPS", "NUM_STAGES")


@contextlib.contextmanager
def settings(**values):
    """This module's settings set to `values` inside the block and restored after, also when it raises (benchmarks
    and tests turn the kernels off or on, or launch them otherwise). A compiled step reads them when it is traced."""
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ValueError(f"no kernel setting {', '.join(unknown)}; the settings are {', '.join(SETTINGS)}")
    old = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(old)


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernels serve a decode step on `tensor`: a CUDA tensor of bf16 / fp16, Triton present, and the step
    being compiled (or IN_EAGER)."""
    return (ENABLED and _OPS is not None and tensor.is_cuda and tensor.dtype in (torch.bfloat16, torch.float16)
            and (IN_EAGER or torch.compiler.is_compiling()))


def scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, K] float32 dot products of grouped queries [B, Hkv, G, D] with keys [B, Hkv, K, D] (unscaled)."""
    return _OPS[0](query, key)


def row_values(row: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, G, D] the row [B, Hkv, G, K] (float32, cast to the values' dtype as a matmul would) times the values
    [B, Hkv, K, D], summed in float32 over splits of the keys; returned in the values' dtype."""
    return _OPS[1](row, value)


def keys_per_program(rows: int, n_keys: int, device: torch.device, per_sm: int | None = None) -> int:
    """Keys one program of a kernel reads: a multiple of BLOCK_KEYS, so that `rows` (sequences x key/value heads) x
    splits makes about `per_sm` (default PROGRAMS_PER_SM) programs per SM. Fixed by the shapes, so a compiled step
    keeps it."""
    per_sm = PROGRAMS_PER_SM if per_sm is None else per_sm
    programs = per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    splits = max(1, programs // max(rows, 1))
    tiles = -(-n_keys // BLOCK_KEYS)
    return BLOCK_KEYS * max(1, -(-tiles // splits))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_OPS = _register()
