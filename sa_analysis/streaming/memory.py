"""What a streaming run needs in memory, and how the causal plane is cut into segments and units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from ..loading import ModelInfo

TRITON_BM, TRITON_BN = 64, 64  # the emit kernel's default tile (rows, keys); key chunks align to TRITON_BN

GIB = 1024**3
OPERAND_SCALE_FP16 = 2.0**14  # P * 2^14 <= 16384 < 65504: fp16 keeps probabilities down to ~1e-12 normal
# operand bytes per unit: big enough for efficient matmuls (on an H100, 1.5 GiB units run the products 3 % faster
# than 0.75 GiB ones), small next to a 7B model; the check in `check_fits` shrinks them when memory is short
OPERAND_BYTES = {"cuda": 1536 * 1024**2, "cpu": 768 * 1024**2}


def operand_bytes(device: torch.device) -> int:
    """The default operand bytes per unit on `device` (CPU sizes for anything that is not CUDA)."""
    return OPERAND_BYTES.get(device.type, OPERAND_BYTES["cpu"])


# ----- planning: memory and segments ----------------------------------------------------------------------------
@dataclass
class StreamPlan:
    """How a run is cut: rows per block, keys per chunk, operand elements per unit, and the bytes it needs."""

    seq_len: int
    device: str
    block_rows: int
    key_chunk: int
    unit_elements: int  # M: (row, key) elements per unit of operands
    operand_dtype: str
    bytes_qk: int
    bytes_stream: int
    bytes_forward: int
    bytes_needed: int
    bytes_free: int | None

    def describe(self) -> str:
        free = "unknown" if self.bytes_free is None else f"{self.bytes_free / GIB:.1f} GiB"
        return (f"seq_len {self.seq_len}: {self.block_rows} rows x {self.key_chunk} keys per segment, "
                f"{self.unit_elements} elements per unit; needs {self.bytes_needed / GIB:.2f} GiB "
                f"(q/k {self.bytes_qk / GIB:.2f}, streaming {self.bytes_stream / GIB:.2f}, "
                f"forward {self.bytes_forward / GIB:.2f}), free {free} on {self.device}")


def _shape(info: ModelInfo) -> dict[str, int]:
    """Shape numbers from a ModelInfo (or anything with the same attributes)."""
    return dict(L=info.n_layers, H=info.n_heads, Hkv=info.n_kv_heads or info.n_heads, D=info.head_dim,
                hidden=info.hidden_size, inter=info.intermediate_size, vocab=info.vocab_size)


def _itemsize(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def _bytes(shape: dict[str, int], n: int, model_item: int, op_item: int, unit_elements: int,
           eager_maps: bool, windowed: bool, rows: int | None = None, parts: int = 1) -> tuple[int, int, int]:
    """(q/k store, streaming working set, forward activations) in bytes for length n (`rows` query rows kept, in
    `parts` sets of sums)."""
    L, H, Hkv, D = shape["L"], shape["H"], shape["Hkv"], shape["D"]
    N = L * H
    kept = n if rows is None else rows
    qk = L * (H * kept + Hkv * n) * D * model_item
    stats = 4 * N * kept * 4  # row statistics (lse, lse2) and the per-row entropy and JS sums
    operands = 3 * N * unit_elements * op_item
    accum = (2 * N * N + N * N) * 4 * (parts + 1)  # accumulators and one product in flight
    stream = stats + operands + accum
    fwd = n * (6 * shape["hidden"] + 3 * shape["inter"] + 2 * (H + 2 * Hkv) * D) * model_item
    if windowed:
        fwd += n * n  # the bool sliding-window mask transformers builds
    if eager_maps:  # eager attention (softcap models) materialises one layer's weights in the forward
        fwd += 2 * H * n * n * 4
    return qk, stream, fwd


def free_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on a CUDA device (free memory plus the allocator's unused cache)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(cached, 0))


def check_fits(info: ModelInfo, seq_len: int, device: torch.device | str, *, operand_dtype: torch.dtype | None = None,
               block_rows: int | None = None, memory_fraction: float = 0.8,
               free: int | None = None, max_operand_bytes: int | None = None, sample: Any = None) -> StreamPlan:
    """Plan a streaming run of `seq_len` tokens on `device`, or raise a UserError that says the longest length that fits.

    `info` is a `ModelInfo` (for a model split over several devices, pass the share of the layers on this device).
    `free` overrides the measured free bytes (tests); `sample` (a RowSample) counts only its query rows. Nothing is
    allocated.
    """
    sampled_rows = None if sample is None else sample.rows
    parts = 1 if sample is None else len(sample.parts)
    device = torch.device(device)
    shape = _shape(info)
    N = shape["L"] * shape["H"]
    model_dtype = getattr(info, "dtype", "float32")
    model_item = _itemsize(model_dtype)
    if operand_dtype is None:
        operand_dtype = default_operand_dtype(device, model_dtype)
    op_item = _itemsize(operand_dtype)
    eager = bool((getattr(info, "extra", None) or {}).get("attn_logit_softcapping")) or \
        getattr(info, "architecture", "") in ("gemma2",)
    windowed = bool(getattr(info, "sliding_window", None))
    if free is None:
        free = free_bytes(device)
    budget = None if free is None else int(free * memory_fraction)

    def plan_for(n: int) -> StreamPlan:
        rows = block_rows or (128 if device.type == "cuda" else 64)
        rows = max(16, min(rows, round_up(n, 16)))
        kept = n if sampled_rows is None else min(sampled_rows, n)
        qk, _, fwd = _bytes(shape, n, model_item, op_item, 0, eager, windowed, kept, parts)
        fixed = qk + max(fwd, 4 * N * kept * 4 + 3 * N * N * 4 * (parts + 1))
        target = max_operand_bytes or operand_bytes(device)
        if budget is not None:
            target = min(target, max(budget - fixed, 0))
        elements = max(target // (3 * N * op_item), rows * TRITON_BN)
        chunk = max(TRITON_BN, min(round_up(n, TRITON_BN), (elements // rows) // TRITON_BN * TRITON_BN))
        elements = max(elements, rows * chunk)
        qk, stream, fwd = _bytes(shape, n, model_item, op_item, elements, eager, windowed, kept, parts)
        needed = qk + max(stream, fwd)
        return StreamPlan(seq_len=n, device=str(device), block_rows=rows, key_chunk=chunk, unit_elements=elements,
                          operand_dtype=str(operand_dtype).removeprefix("torch."), bytes_qk=qk, bytes_stream=stream,
                          bytes_forward=fwd, bytes_needed=needed, bytes_free=free)

    plan = plan_for(seq_len)
    if budget is None or plan.bytes_needed <= budget:
        return plan
    lo, hi = 0, seq_len  # largest n (multiple of 256) whose plan fits
    while hi - lo > 256:
        mid = (lo + hi) // 2
        if plan_for(mid).bytes_needed <= budget:
            lo = mid
        else:
            hi = mid
    longest = lo // 256 * 256
    where = f"{device.type}:{device.index or 0}" if device.type == "cuda" else str(device)
    fits = (f"the longest length that fits is {longest} tokens (use --seq-len {longest})" if longest > 0
            else "no length fits: free memory or use more GPUs (--device-map auto)")
    raise UserError(
        f"Streaming attention statistics at {seq_len} tokens needs {plan.bytes_needed / GIB:.1f} GiB but only "
        f"{budget / GIB:.1f} GiB are free on {where}; {fits}.")


def default_operand_dtype(device: torch.device | str, model_dtype: str | torch.dtype = "float32") -> torch.dtype:
    """float16 operands with fp32 accumulation on GPU; the accumulator dtype itself on CPU (float32, or float64)."""
    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype.removeprefix("torch."), torch.float32)
    if model_dtype == torch.float64:
        return torch.float64
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class Segment:
    """Query rows [r0, r0 + rows) x keys [k0, k0 + keys), at element offset `offset` of its unit.

    Rows are compact indices: positions in the sequence for a run over all rows, indices into the sampled positions
    for a sampled run (`part` says whose sums the segment feeds: the fixed rows or one replicate)."""

    r0: int
    rows: int
    k0: int
    keys: int
    offset: int = 0
    part: int = 0

    @property
    def elements(self) -> int:
        return self.rows * self.keys


def plan_segments(n: int, exclude_first: int, windows: Sequence[int | None], block_rows: int, key_chunk: int,
                  unit_elements: int, key_align: int = 1, positions: Sequence[int] | None = None,
                  parts: Sequence[int] | None = None) -> list[list[Segment]]:
    """Cut the causal region of rows [exclude_first, n) into segments and pack consecutive ones into units.

    Keys of a row block run from `exclude_first` (or the earliest key any layer's window reaches, when every layer
    slides) to the block's last row. Segments of a unit are laid out one after the other along the elements axis.
    With `positions` (a sampled run: consecutive `parts` of the given sizes, each sorted) the blocks are cut from one
    part's rows at a time, keys run to the block's last position, and a unit holds segments of one part only.
    """
    all_slide = bool(windows) and all(w for w in windows)
    widest = max(windows) if all_slide else None
    units: list[list[Segment]] = []
    unit: list[Segment] = []
    used = 0
    for part, r0, rows, first, last in _row_blocks(n, exclude_first, block_rows, positions, parts):
        k_lo = exclude_first if widest is None else max(exclude_first, first - widest + 1)
        k_lo = k_lo // key_align * key_align
        k_hi = last + 1
        for k0 in range(k_lo, k_hi, key_chunk):
            keys = min(key_chunk, k_hi - k0)
            seg_elems = rows * keys
            if unit and (used + seg_elems > unit_elements or unit[0].part != part):
                units.append(unit)
                unit, used = [], 0
            unit.append(Segment(r0, rows, k0, keys, used, part))
            used += seg_elems
    if unit:
        units.append(unit)
    return units


def _row_blocks(n: int, exclude_first: int, block_rows: int, positions: Sequence[int] | None,
                parts: Sequence[int] | None):
    """(part, first compact row, rows, first position, last position) of each block of query rows."""
    if positions is None:
        for r0 in range(exclude_first, n, block_rows):
            rows = min(block_rows, n - r0)
            yield 0, r0, rows, r0, r0 + rows - 1
        return
    start = 0
    for part, size in enumerate(parts if parts is not None else [len(positions)]):
        for r0 in range(start, start + size, block_rows):
            rows = min(block_rows, start + size - r0)
            yield part, r0, rows, int(positions[r0]), int(positions[r0 + rows - 1])
        start += size
