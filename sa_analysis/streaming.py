"""Streaming engine: all pairwise attention statistics of one long sequence without any `L x H x n x n` tensor.

One SDPA-speed forward runs under `capture_attention` with a `QKStore` recorder that keeps every layer's post-RoPE
queries and keys (model dtype, on the layer's device). Then the causal part of the `n x n` attention plane is cut
into *segments* (a range of query rows x a range of keys) and, segment by segment, the attention probabilities of
all layers and heads are recomputed and written as the operands of DESIGN.md section 3:

    X  = P (0 where masked)           Xr = P / |P_row|            Y = log P (0 where masked)

packed as `U = [Xr; X; Y]`, `[3, N, M]` with `N = L * H` (layer, head) rows and `M` the elements of the segments of
one *unit*. Per unit two matrix products accumulate, in fp32,

    acc_xy += X @ [X; Y]^T      (flat-cosine Gram and the KL cross terms)
    acc_r  += Xr @ Xr^T         (row-cosine Gram)

Entropies and the Jensen-Shannon divergence of adjacent layers are summed while the operands are written.

Row statistics (log-sum-exp of each row, and of the squared probabilities for the row norm) come first, in one
pass over the whole sequence, so that segments can split rows into chunks of keys: memory per unit is independent
of the sequence length. On CUDA two Triton kernels do the recomputation (flash-attention style: QK^T tiles in
registers, GQA by indexing the shared key head, softcapping, causal and sliding-window masks from indices,
`exclude_first` as a mask on the first keys, which is the renormalisation of `metrics.drop_first_keys`);
elsewhere, or for masks that are not causal/sliding (padding), the same operands come from plain torch.

Precision: the matmul operands default to float16 on GPU (10-bit mantissa, 8x finer than bfloat16; P and Xr are
scaled by 2^14, an exact power of two, so that small probabilities stay normal) with fp32 accumulation; KL uses
`diag(C)` for `sum P log P` so that `KL(a||a)` is exactly 0 and rounding errors of similar maps cancel. Where
layers' masks differ (sliding window vs global) the support term of KL (infinite where `a` attends where `b` is
masked) is decided from the windows, exactly, instead of from underflow-prone sums.

Several devices (`--device-map auto`): layers are grouped by the device they live on; each group keeps its own
queries/keys, row statistics and the rows of the accumulators that belong to its layers; operands are copied to
the other devices for the products, and the rows are gathered at the end on the first layer's device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from .capture import AttentionInputs, attention_modules, capture_attention, causal_allowed, masked_log_softmax
from .errors import UserError
from .metrics import SequenceStats, js_divergence

GIB = 1024**3
OPERAND_SCALE_FP16 = 2.0**14  # P * 2^14 <= 16384 < 65504: fp16 keeps probabilities down to ~1e-12 normal
# operand bytes per unit: big enough for efficient matmuls (on an H100, 1.5 GiB units run the products 3 % faster
# than 0.75 GiB ones), small next to a 7B model; the check in `check_fits` shrinks them when memory is short
OPERAND_BYTES = {"cuda": 1536 * 1024**2, "cpu": 768 * 1024**2}


def operand_bytes(device: torch.device) -> int:
    """The default operand bytes per unit on `device` (CPU sizes for anything that is not CUDA)."""
    return OPERAND_BYTES.get(device.type, OPERAND_BYTES["cpu"])
MIN_BLOCK_ROWS = 64
TRITON_BM, TRITON_BN = 64, 64


# ----- recorder: keep post-RoPE queries and keys --------------------------------------------------------------
@dataclass
class LayerSpec:
    """How to recompute one layer's attention: scaling, softcap and its mask (iota window or a generic mask)."""

    scaling: float
    softcap: float | None
    window: int | None  # sliding window (keys i-window < j <= i); None = plain causal
    generic_mask: torch.Tensor | None = None  # set when the mask is not causal/sliding (e.g. padding)
    inputs: AttentionInputs | None = None  # kept only for generic masks (to slice `allowed`)


@dataclass
class LayerGroup:
    """Consecutive layers on one device; `halo` = 1 when the previous layer is copied in (JS across the border)."""

    start: int
    stop: int
    device: torch.device
    halo: int = 0

    @property
    def n_layers(self) -> int:
        return self.stop - self.start

    @property
    def first_stored(self) -> int:
        return self.start - self.halo


class QKStore:
    """Recorder that copies every layer's post-RoPE query `[Hq, n, D]` and key `[Hkv, n, D]` into per-device buffers.

    `groups` are consecutive layer ranges on one device (by default read off the attention modules' parameters);
    buffers are allocated on the first record of each group, in the dtype of the recorded tensors.
    """

    layers = None  # every layer

    def __init__(self, n_layers: int, groups: Sequence[LayerGroup] | None = None):
        self.n_layers = n_layers
        self.groups: list[LayerGroup] = list(groups) if groups else [LayerGroup(0, n_layers, torch.device("cpu"))]
        self._group_of = {}
        for gi, g in enumerate(self.groups):
            for layer in range(g.start, g.stop):
                self._group_of[layer] = gi
        if sorted(self._group_of) != list(range(n_layers)):
            raise ValueError(f"layer groups {[(g.start, g.stop) for g in self.groups]} do not cover 0..{n_layers - 1}")
        for gi, g in enumerate(self.groups):
            g.halo = 1 if g.start > 0 else 0
        self.q: list[torch.Tensor | None] = [None] * len(self.groups)
        self.k: list[torch.Tensor | None] = [None] * len(self.groups)
        self.specs: list[LayerSpec | None] = [None] * n_layers
        self.seq_len: int | None = None
        self._mask_cache: dict[tuple, int | None | str] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> "QKStore":
        """A store whose groups follow the devices of the model's attention modules (one group per device run)."""
        modules = attention_modules(model)
        by_name = dict(model.named_modules())
        name_of = {id(m): n for n, m in by_name.items()}
        devices = [_execution_device(m, name_of[id(m)], by_name) for m in modules]
        groups: list[LayerGroup] = []
        for layer, dev in enumerate(devices):
            if groups and groups[-1].device == dev:
                groups[-1].stop = layer + 1
            else:
                groups.append(LayerGroup(layer, layer + 1, dev))
        return cls(len(modules), groups)

    # -- recording
    def record(self, inputs: AttentionInputs) -> None:
        q, k = inputs.query, inputs.key
        if q.shape[0] != 1:
            raise ValueError("the streaming engine analyses one sequence at a time (batch size 1)")
        if q.shape[2] != k.shape[2]:
            raise ValueError("the streaming engine needs a forward without cache (queries and keys of the same length)")
        n = q.shape[2]
        if self.seq_len is None:
            self.seq_len = n
        elif self.seq_len != n:
            raise ValueError(f"layers saw different lengths ({self.seq_len} and {n})")
        layer = inputs.layer_idx
        gi = self._group_of[layer]
        g = self.groups[gi]
        if self.q[gi] is None:
            slots = g.n_layers + g.halo
            self.q[gi] = _stacked_like(q[0], slots)
            self.k[gi] = _stacked_like(k[0], slots)
            g.device = q.device
        self.q[gi][layer - g.first_stored].copy_(q[0])
        self.k[gi][layer - g.first_stored].copy_(k[0])
        self.specs[layer] = self._spec(inputs)

    def _spec(self, inputs: AttentionInputs) -> LayerSpec:
        window = inputs.sliding_window if inputs.sliding_window else None
        spec = LayerSpec(scaling=float(inputs.scaling), softcap=inputs.softcap, window=window)
        if inputs.mask is not None:
            key = (inputs.mask.data_ptr(), tuple(inputs.mask.shape), inputs.mask.dtype, window)
            if key not in self._mask_cache:
                self._mask_cache[key] = "iota" if _mask_is_causal(inputs, window) else "generic"
            if self._mask_cache[key] == "generic":
                spec.generic_mask = inputs.mask
                spec.inputs = AttentionInputs(inputs.layer_idx, inputs.query[:, :, :0], inputs.key[:, :, :0],
                                              inputs.mask, inputs.scaling, inputs.softcap, inputs.sliding_window)
        return spec

    def finish(self) -> None:
        """Check every layer was recorded and copy each group's halo layer (the previous group's last layer)."""
        missing = [i for i, s in enumerate(self.specs) if s is None]
        if missing:
            raise RuntimeError(f"layers {missing} were not recorded; did the forward run inside capture_attention?")
        for gi, g in enumerate(self.groups):
            if g.halo:
                prev = self.groups[gi - 1]
                src = g.start - 1 - prev.first_stored
                self.q[gi][0].copy_(self.q[gi - 1][src])
                self.k[gi][0].copy_(self.k[gi - 1][src])

    def release(self) -> None:
        self.q = [None] * len(self.groups)
        self.k = [None] * len(self.groups)

    # -- building a store without a model (tests, notebooks)
    @classmethod
    def from_inputs(cls, inputs: Iterable[AttentionInputs], groups: Sequence[tuple[int, int]] | None = None,
                    devices: Sequence[torch.device | str] | None = None) -> "QKStore":
        """A filled store from recorded `AttentionInputs` (one per layer, in order); `groups` splits the layers."""
        inputs = list(inputs)
        n_layers = len(inputs)
        splits = list(groups) if groups else [(0, n_layers)]
        devs = [torch.device(d) for d in devices] if devices else [inputs[0].query.device] * len(splits)
        store = cls(n_layers, [LayerGroup(a, b, d) for (a, b), d in zip(splits, devs)])
        for inp in inputs:
            gi = store._group_of[inp.layer_idx]
            moved = AttentionInputs(inp.layer_idx, inp.query.to(devs[gi]), inp.key.to(devs[gi]),
                                    None if inp.mask is None else inp.mask.to(devs[gi]),
                                    inp.scaling, inp.softcap, inp.sliding_window)
            store.record(moved)
        store.finish()
        return store


def _stacked_like(t: torch.Tensor, slots: int) -> torch.Tensor:
    """An empty `[slots, H, n, D]` buffer laid out like `t` `[H, n, D]`, so that recording a layer is a plain copy.

    Models project queries/keys as `[n, H, D]` and transpose, so `t` is usually token-major (head stride D); a
    head-major buffer would turn every recording into a strided transpose. The kernels take any strides.
    """
    H, n, D = t.shape
    if t.stride(1) > t.stride(0):  # token-major
        return torch.empty((slots, n, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)
    return torch.empty((slots, H, n, D), dtype=t.dtype, device=t.device)


def _execution_device(module: torch.nn.Module, name: str, by_name: dict[str, torch.nn.Module]) -> torch.device:
    """Where `module` computes: its weights' device, or, for weights offloaded by accelerate (on "meta" between
    forwards), the execution device of the hook on it or on its nearest ancestor."""
    first = next(module.parameters(), None)
    if first is not None and first.device.type != "meta":
        return first.device
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        hook = getattr(by_name.get(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return torch.device("cpu")


def _mask_is_causal(inputs: AttentionInputs, window: int | None, chunk: int = 2048) -> bool:
    """Whether `inputs.mask` equals the causal (sliding-window) pattern, compared in chunks of rows."""
    n_q, n_k = inputs.query.shape[2], inputs.key.shape[2]
    mask = inputs.mask
    if mask.shape[0] != 1 or mask.shape[-1] < n_k:
        return False
    for start in range(0, n_q, chunk):
        rows = slice(start, min(n_q, start + chunk))
        m = mask[:, :, rows, :n_k]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        if not torch.equal(allowed, causal_allowed(rows, n_q, n_k, n_k, window, m.device).expand_as(allowed)):
            return False
    return True


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
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        free = "unknown" if self.bytes_free is None else f"{self.bytes_free / GIB:.1f} GiB"
        return (f"seq_len {self.seq_len}: {self.block_rows} rows x {self.key_chunk} keys per segment, "
                f"{self.unit_elements} elements per unit; needs {self.bytes_needed / GIB:.2f} GiB "
                f"(q/k {self.bytes_qk / GIB:.2f}, streaming {self.bytes_stream / GIB:.2f}, "
                f"forward {self.bytes_forward / GIB:.2f}), free {free} on {self.device}")


def _shape(info: Any) -> dict[str, int]:
    """Shape numbers from a ModelInfo (or anything with the same attributes)."""
    return dict(L=info.n_layers, H=info.n_heads, Hkv=info.n_kv_heads or info.n_heads, D=info.head_dim,
                hidden=info.hidden_size, inter=info.intermediate_size, vocab=info.vocab_size)


def _itemsize(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def _bytes(shape: dict[str, int], n: int, model_item: int, op_item: int, unit_elements: int,
           eager_maps: bool, windowed: bool) -> tuple[int, int, int]:
    """(q/k store, streaming working set, forward activations) in bytes for length n."""
    L, H, Hkv, D = shape["L"], shape["H"], shape["Hkv"], shape["D"]
    N = L * H
    qk = L * (H + Hkv) * n * D * model_item
    stats = 2 * N * n * 4
    operands = 3 * N * unit_elements * op_item
    accum = (2 * N * N + N * N) * 4 * 2  # accumulators and one product in flight
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


def check_fits(info: Any, seq_len: int, device: torch.device | str, *, operand_dtype: torch.dtype | None = None,
               block_rows: int | None = None, memory_fraction: float = 0.8,
               free: int | None = None, max_operand_bytes: int | None = None) -> StreamPlan:
    """Plan a streaming run of `seq_len` tokens on `device`, or raise a UserError that says the longest length that fits.

    `info` is a `ModelInfo` (for a model split over several devices, pass the share of the layers on this device).
    `free` overrides the measured free bytes (tests). Nothing is allocated.
    """
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
        rows = max(16, min(rows, _round_up(n, 16)))
        qk, _, fwd = _bytes(shape, n, model_item, op_item, 0, eager, windowed)
        fixed = qk + max(fwd, 2 * N * n * 4 + 3 * N * N * 4 * 2)
        target = max_operand_bytes or operand_bytes(device)
        if budget is not None:
            target = min(target, max(budget - fixed, 0))
        elements = max(target // (3 * N * op_item), rows * TRITON_BN)
        chunk = max(TRITON_BN, min(_round_up(n, TRITON_BN), (elements // rows) // TRITON_BN * TRITON_BN))
        elements = max(elements, rows * chunk)
        qk, stream, fwd = _bytes(shape, n, model_item, op_item, elements, eager, windowed)
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


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class Segment:
    """Query rows [r0, r0 + rows) x keys [k0, k0 + keys), at element offset `offset` of its unit."""

    r0: int
    rows: int
    k0: int
    keys: int
    offset: int = 0

    @property
    def elements(self) -> int:
        return self.rows * self.keys


def plan_segments(n: int, exclude_first: int, windows: Sequence[int | None], block_rows: int, key_chunk: int,
                  unit_elements: int, key_align: int = 1) -> list[list[Segment]]:
    """Cut the causal region of rows [exclude_first, n) into segments and pack consecutive ones into units.

    Keys of a row block run from `exclude_first` (or the earliest key any layer's window reaches, when every layer
    slides) to the block's last row. Segments of a unit are laid out one after the other along the elements axis.
    """
    all_slide = bool(windows) and all(w for w in windows)
    widest = max(windows) if all_slide else None
    units: list[list[Segment]] = []
    unit: list[Segment] = []
    used = 0
    for r0 in range(exclude_first, n, block_rows):
        rows = min(block_rows, n - r0)
        k_lo = exclude_first if widest is None else max(exclude_first, r0 - widest + 1)
        k_lo = k_lo // key_align * key_align
        k_hi = r0 + rows
        for k0 in range(k_lo, k_hi, key_chunk):
            keys = min(key_chunk, k_hi - k0)
            seg_elems = rows * keys
            if unit and used + seg_elems > unit_elements:
                units.append(unit)
                unit, used = [], 0
            unit.append(Segment(r0, rows, k0, keys, used))
            used += seg_elems
    if unit:
        units.append(unit)
    return units


# ----- the engine ------------------------------------------------------------------------------------------------
class _GroupState:
    """Per layer group: its device, accumulator rows, row statistics, and the operand buffer on its device."""

    def __init__(self, group: LayerGroup, n_total_rows: int, n_layers: int, n_heads: int, acc_dtype, support: bool):
        self.group = group
        dev = group.device
        rows = group.n_layers * n_heads
        self.rows = slice(group.start * n_heads, group.stop * n_heads)
        z = lambda *s: torch.zeros(*s, dtype=acc_dtype, device=dev)  # noqa: E731
        self.acc_xy = z(rows, 2 * n_total_rows)
        self.acc_r = z(rows, n_total_rows)
        self.acc_s = z(rows, n_total_rows) if support else None
        self.neg_entropy = z(n_layers * n_heads)
        self.js = z(max(n_layers - 1, 0) * n_heads)
        self.buffer: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.lse2: torch.Tensor | None = None


class StreamingStatistics:
    """Computes `SequenceStats` from a filled `QKStore` (see the module docstring for the method).

    Tuning knobs (defaults measured best on an H100 at Llama-2-7B shape, see benchmarks/README.md):
    `block_rows`/`key_chunk`/`unit_elements` cut the causal plane into segments and units; `gram` is "tri"
    (upper block-triangle of the symmetric products, `tri_chunks` row chunks), "full" or "splitk"; `tile` is the
    emit kernel's (rows, keys, warps[, pipeline stages[, register cap]]) and `stats_tile` the row-statistics
    kernel's (rows, keys, warps[, stages]); `overlap` runs products on a side stream with a second operand buffer
    (no gain measured: cuBLAS fills the GPU; it doubles operand memory, which `check_fits` does not count).
    `backend` "auto" uses Triton on CUDA for causal/sliding masks, plain torch otherwise.
    """

    def __init__(self, store: QKStore, *, exclude_first: int = 0, operand_dtype: torch.dtype | None = None,
                 block_rows: int | None = None, key_chunk: int | None = None, unit_elements: int | None = None,
                 backend: str = "auto", gram: str = "auto", tri_chunks: int = 2,
                 tile: tuple[int, ...] = (TRITON_BM, TRITON_BN, 4, 2), stats_tile: tuple[int, ...] = (128, 64, 4),
                 overlap: bool = False, profile: bool = False):
        if store.seq_len is None or store.q[0] is None:
            raise ValueError("the store is empty; run a forward inside capture_attention(model, store) first")
        self.store = store
        self.n = store.seq_len
        q0 = store.q[0]
        self.n_layers = store.n_layers
        self.n_heads = q0.shape[1]
        self.n_kv = store.k[0].shape[1]
        self.head_dim = q0.shape[-1]
        self.N = self.n_layers * self.n_heads
        self.exclude_first = int(exclude_first)
        if not 0 <= self.exclude_first < self.n:
            raise ValueError(f"exclude_first={exclude_first} leaves no key of a {self.n}-token sequence")
        self.model_dtype = q0.dtype
        self.acc_dtype = torch.float64 if self.model_dtype == torch.float64 else torch.float32
        primary = store.groups[0].device
        self.operand_dtype = operand_dtype or default_operand_dtype(primary, self.model_dtype)
        if self.acc_dtype == torch.float64:
            self.operand_dtype = torch.float64
        self.out_scale = OPERAND_SCALE_FP16 if self.operand_dtype == torch.float16 else 1.0
        self.specs = store.specs
        self.generic = any(s.generic_mask is not None for s in self.specs)
        windows = [s.window for s in self.specs]
        self.windows = windows
        self.support_gram = self.generic  # iota masks: support decided from the windows
        on_cuda = all(g.device.type == "cuda" for g in store.groups)
        if backend == "auto":
            fast_dtype = self.model_dtype in (torch.bfloat16, torch.float16, torch.float32)
            backend = "triton" if (on_cuda and fast_dtype and not self.generic and _triton_ok()) else "torch"
        if backend == "triton" and (self.generic or not on_cuda and os.environ.get("TRITON_INTERPRET") != "1"):
            raise ValueError("the triton backend needs CUDA tensors and causal/sliding-window masks")
        self.backend = backend
        single = len(store.groups) == 1
        self.gram = ("tri" if single else "full") if gram == "auto" else gram
        if self.gram in ("tri", "splitk") and not single:
            self.gram = "full"
        self.tri_chunks = max(1, tri_chunks)
        self.tile = tuple(tile)
        self.bm, self.bn, self.warps = tile[:3]
        self.stats_tile = stats_tile
        self.overlap = overlap and on_cuda and single
        self.compiled: dict[str, Any] = {}
        rows = block_rows or (128 if backend == "triton" else 64)
        if backend == "triton":
            rows = _round_up(rows, self.bm)
        self.block_rows = rows
        align = self.bn if backend == "triton" else 1
        elements = unit_elements or max(operand_bytes(primary) // (3 * self.N * self.operand_dtype.itemsize),
                                        rows * align)
        chunk = key_chunk or max(align, (elements // rows) // align * align)
        self.key_chunk = _round_up(min(chunk, self.n), align)
        self.unit_elements = max(elements, rows * self.key_chunk)
        self.units = plan_segments(self.n, self.exclude_first, windows, rows, self.key_chunk, self.unit_elements)
        self.states = [_GroupState(g, self.N, self.n_layers, self.n_heads, self.acc_dtype, self.support_gram)
                       for g in store.groups]
        self.n_rows = 0
        self.profile = profile and on_cuda
        self.timings: dict[str, float] = {}
        self._events: dict[str, list] = {}

    def _event(self, phase: str, start: bool) -> None:
        if not self.profile:
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        if start:
            self._events.setdefault(phase, []).append([ev, None])
        else:
            self._events[phase][-1][1] = ev

    def _collect_timings(self) -> None:
        if not self.profile:
            return
        torch.cuda.synchronize()
        for phase, pairs in self._events.items():
            self.timings[phase + "_ms"] = sum(a.elapsed_time(b) for a, b in pairs)
        self.timings["units"] = len(self.units)
        self.timings["unit_elements"] = self.unit_elements
        self.timings["block_rows"] = self.block_rows
        self.timings["key_chunk"] = self.key_chunk

    # -- main loop
    def run(self) -> SequenceStats:
        planes = 4 if self.support_gram else 3
        max_elems = max(sum(s.elements for s in unit) for unit in self.units)
        for st in self.states:
            st.buffer = torch.empty(planes * self.N * max_elems, dtype=self.operand_dtype, device=st.group.device)
        if self.backend == "triton":
            self._event("row_stats", True)
            for gi, st in enumerate(self.states):
                self._triton_row_stats(gi, st)
            self._event("row_stats", False)
            self.n_rows = self.n - self.exclude_first
        if self.overlap and self.backend == "triton":
            self._event("units", True)
            self._run_overlapped(planes)
            self._event("units", False)
            return self._finish()
        emitter = None if self.backend == "triton" else _TorchEmitter(self)
        for unit in self.units:
            m = sum(s.elements for s in unit)
            self._event("emit", True)
            for gi, st in enumerate(self.states):
                U = st.buffer[: planes * self.N * m].view(planes, self.N, m)
                for seg in unit:
                    if self.backend == "triton":
                        self._triton_emit(gi, st, seg, U)
                    else:
                        emitter.emit(gi, st, seg, U)
            if emitter is not None:
                self.n_rows += emitter.take_rows()
            self._exchange(m, planes)
            self._event("emit", False)
            self._event("gemm", True)
            for st in self.states:
                U = st.buffer[: planes * self.N * m].view(planes, self.N, m)
                self._accumulate(st, U)
            self._event("gemm", False)
        return self._finish()

    def _finish(self) -> SequenceStats:
        for st in self.states:
            st.buffer = None
            rows = getattr(st, "neg_entropy_rows", None)
            if rows is not None:  # the Triton kernels' per-row sums, in bits
                st.neg_entropy += rows.sum(dim=1).to(st.neg_entropy.dtype) * math.log(2)
                st.js += st.js_rows.sum(dim=1).to(st.js.dtype) * math.log(2)
                st.neg_entropy_rows = st.js_rows = None
        self._event("result", True)
        result = self._result()
        self._event("result", False)
        self._collect_timings()
        return result

    def _run_overlapped(self, planes: int) -> None:
        """Single device: emit unit i+1 on the current stream while a side stream multiplies unit i (two buffers)."""
        st = self.states[0]
        dev = st.group.device
        main = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        buffers = [st.buffer, torch.empty_like(st.buffer)]
        done: list[torch.cuda.Event | None] = [None, None]
        for i, unit in enumerate(self.units):
            b = i % 2
            if done[b] is not None:
                main.wait_event(done[b])
            m = sum(seg.elements for seg in unit)
            U = buffers[b][: planes * self.N * m].view(planes, self.N, m)
            for seg in unit:
                self._triton_emit(0, st, seg, U)
            ready = torch.cuda.Event()
            ready.record(main)
            with torch.cuda.stream(side):
                side.wait_event(ready)
                self._accumulate(st, U)
                finished = torch.cuda.Event()
                finished.record(side)
            done[b] = finished
        main.wait_stream(side)
        del buffers

    def _exchange(self, m: int, planes: int) -> None:
        """Copy each group's operand rows into the other groups' buffers (several devices only)."""
        if len(self.states) == 1:
            return
        views = [st.buffer[: planes * self.N * m].view(planes, self.N, m) for st in self.states]
        for si, src in enumerate(self.states):
            for di, dst in enumerate(self.states):
                if si != di:
                    views[di][:, src.rows].copy_(views[si][:, src.rows])

    def _accumulate(self, st: _GroupState, U: torch.Tensor) -> None:
        N = self.N
        m = U.shape[-1]
        Xr, X = U[0], U[1]
        XY = U[1:3].reshape(2 * N, m)
        if self.gram == "splitk" and m % self.tri_chunks == 0:
            S, ms = self.tri_chunks, m // self.tri_chunks
            A = X[st.rows].reshape(-1, S, ms).transpose(0, 1)  # [S, rows, ms] (views)
            B = XY.view(2 * N, S, ms).permute(1, 2, 0)  # [S, ms, 2N]
            st.acc_xy += _bmm32(A, B, self.acc_dtype).sum(0)
            Ar = Xr[st.rows].reshape(-1, S, ms).transpose(0, 1)
            Br = Xr.view(N, S, ms).permute(1, 2, 0)
            st.acc_r += _bmm32(Ar, Br, self.acc_dtype).sum(0)
        elif self.gram == "tri":
            bounds = _chunk_bounds(N, self.tri_chunks)
            for a, b in bounds:
                st.acc_xy[a:b, a:] += _mm32(X[a:b], XY[a:].T, self.acc_dtype)
                st.acc_r[a:b, a:] += _mm32(Xr[a:b], Xr[a:].T, self.acc_dtype)
        else:
            st.acc_xy += _mm32(X[st.rows], XY.T, self.acc_dtype)
            st.acc_r += _mm32(Xr[st.rows], Xr.T, self.acc_dtype)
        if st.acc_s is not None:
            st.acc_s += _mm32(X[st.rows], U[3].T, self.acc_dtype)

    # -- result
    def _result(self) -> SequenceStats:
        N, L, H = self.N, self.n_layers, self.n_heads
        out_dev = self.states[0].group.device
        gather = lambda t: t.to(out_dev)  # noqa: E731
        acc_xy = torch.cat([gather(st.acc_xy) for st in self.states], dim=0)
        acc_r = torch.cat([gather(st.acc_r) for st in self.states], dim=0)
        neg_entropy = sum(gather(st.neg_entropy) for st in self.states)
        js = sum(gather(st.js) for st in self.states)
        gram, cross = acc_xy[:, :N], acc_xy[:, N:]
        if self.gram == "tri":
            upper = _block_upper(N, self.tri_chunks, out_dev)
            gram = torch.where(upper, gram, gram.T)
            acc_r = torch.where(upper, acc_r, acc_r.T)
        s = self.out_scale
        gram = gram / (s * s)
        acc_r = acc_r / (s * s)
        cross = cross / s
        if self.backend == "triton":  # the kernels write Y = log2 P
            cross = cross * math.log(2)
        rows = max(self.n_rows, 1)
        tiny = torch.finfo(self.acc_dtype).tiny
        diag = gram.diagonal().clamp_min(tiny)
        cos_flat = gram / torch.sqrt(diag[:, None] * diag[None, :])
        kl = (cross.diagonal()[:, None] - cross) / rows
        if self.support_gram:
            miss = torch.cat([gather(st.acc_s) for st in self.states], dim=0) > 0
        else:
            miss = self._support_miss(out_dev)
        kl = torch.where(miss, torch.full_like(kl, float("inf")), kl)
        shape = (L, H, L, H)
        return SequenceStats(
            cosine_flat=cos_flat.reshape(shape),
            cosine_row=(acc_r / rows).reshape(shape),
            kl=kl.clamp_min(0.0).reshape(shape),
            entropy=(-neg_entropy / rows).reshape(L, H),
            js_adjacent=(js / rows).reshape(max(L - 1, 0), H),
            n_rows=self.n_rows,
        )

    def _support_miss(self, device) -> torch.Tensor:
        """[N, N] bool: layer a attends somewhere layer b cannot (b's window is narrower and bites), from windows."""
        H, n, k = self.n_heads, self.n, self.exclude_first
        inf = float("inf")
        w = torch.tensor([s.window if s.window else inf for s in self.specs], dtype=torch.float64)
        bites = (n - 1 - w) >= k  # some valid row i >= k has keys <= i - w_b that are >= k
        miss_layers = (w[None, :] < w[:, None]) & bites[None, :]
        if not miss_layers.any():  # every layer sees the same keys: nothing to copy to the device
            return torch.zeros(self.N, self.N, dtype=torch.bool, device=device)
        return miss_layers.to(device).repeat_interleave(H, 0).repeat_interleave(H, 1)

    # -- triton backend
    def _layer_arrays(self, st: _GroupState):
        g = st.group
        specs = [self.specs[i] for i in range(g.first_stored, g.stop)]
        dev = g.device
        win = torch.tensor([s.window or 0 for s in specs], dtype=torch.int32, device=dev)
        scale = torch.tensor([s.scaling for s in specs], dtype=torch.float32, device=dev)
        cap = torch.tensor([s.softcap or 0.0 for s in specs], dtype=torch.float32, device=dev)
        return win, scale, cap, any(s.softcap for s in specs)

    def _triton_row_stats(self, gi: int, st: _GroupState) -> None:
        kernels = _triton_kernels()
        q, k = self.store.q[gi], self.store.k[gi]
        slots = q.shape[0]
        st.lse = torch.empty(slots * self.n_heads, self.n, dtype=torch.float32, device=q.device)
        st.lse2 = torch.empty_like(st.lse)
        # per-row partial sums of sum P log P and of the JS terms (no block-wide reductions), folded in _finish
        st.neg_entropy_rows = torch.zeros(self.N, self.n, dtype=torch.float32, device=q.device)
        st.js_rows = torch.zeros(max(self.n_layers - 1, 0) * self.n_heads, self.n, dtype=torch.float32,
                                 device=q.device)
        st.arrays = self._layer_arrays(st)
        win, scale, cap, softcap = st.arrays
        r0 = self.exclude_first
        bm, bn, warps = self.stats_tile[:3]
        extra = _launch_options(self.stats_tile)
        grid = (triton_cdiv(self.n - r0, bm), slots * self.n_heads)
        with _on_device(q.device):
            self.compiled["row_stats"] = kernels.row_stats[grid](
                q, k, win, scale, cap, st.lse, st.lse2,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                self.n, r0, self.exclude_first,
                HQ=self.n_heads, REP=self.n_heads // self.n_kv, D=self.head_dim,
                DP=_next_pow2(self.head_dim), BM=bm, BN=bn, SOFTCAP=softcap,
                IEEE=q.dtype == torch.float32, num_warps=warps, **extra)

    def _triton_emit(self, gi: int, st: _GroupState, seg: Segment, U: torch.Tensor) -> None:
        kernels = _triton_kernels()
        q, k = self.store.q[gi], self.store.k[gi]
        win, scale, cap, softcap = st.arrays
        g = st.group
        grid = (triton_cdiv(seg.rows, self.bm), triton_cdiv(seg.keys, self.bn), self.n_heads)
        extra = _launch_options(self.tile)
        with _on_device(q.device):
            self.compiled["emit"] = kernels.emit[grid](
                q, k, win, scale, cap, st.lse, st.lse2, U,
                st.neg_entropy_rows, st.js_rows,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                self.n, seg.r0, seg.rows, seg.k0, seg.keys, seg.offset, self.exclude_first,
                U.stride(0), U.stride(1), g.first_stored, q.shape[0], g.halo, self.out_scale,
                HQ=self.n_heads, REP=self.n_heads // self.n_kv, D=self.head_dim,
                DP=_next_pow2(self.head_dim), BM=self.bm, BN=self.bn, SOFTCAP=softcap,
                IEEE=q.dtype == torch.float32, num_warps=self.warps, **extra)


def _launch_options(tile: Sequence[int]) -> dict[str, int]:
    """Triton launch options from the optional tail of a tile tuple (rows, keys, warps[, stages[, registers]])."""
    return {name: v for name, v in zip(("num_stages", "maxnreg"), tile[3:]) if v}


def _chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    size = _round_up(max(1, -(-n // chunks)), 16)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _block_upper(n: int, chunks: int, device) -> torch.Tensor:
    """[n, n] bool: True in the blocks (i, j) with i <= j of the chunking used by the triangular products."""
    size = _chunk_bounds(n, chunks)[0][1]
    idx = torch.arange(n, device=device) // size  # chunk of each row (built on the device: no host copy)
    return idx[:, None] <= idx[None, :]


_MM_DTYPE_OK: bool | None = None


def _mm32(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result (and the accumulation) in `acc_dtype`; low-precision operands stay low on GPU."""
    global _MM_DTYPE_OK
    if a.dtype == acc_dtype:
        return a @ b
    if a.is_cuda and acc_dtype == torch.float32 and _MM_DTYPE_OK is not False:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_DTYPE_OK = True
            return out
        except (TypeError, RuntimeError):
            _MM_DTYPE_OK = False
    return a.to(acc_dtype) @ b.to(acc_dtype)  # CPU: same rounding of operands, exact products


def _bmm32(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    if a.dtype == acc_dtype:
        return torch.bmm(a, b)
    if a.is_cuda and acc_dtype == torch.float32:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.bmm(a.to(acc_dtype), b.to(acc_dtype))


class _on_device:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _next_pow2(x: int) -> int:
    return 1 << (max(16, x) - 1).bit_length()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----- torch backend (CPU, generic masks, fallback) ------------------------------------------------------------------
class _TorchEmitter:
    """Writes operands with plain torch ops: per row block, the log-probabilities of all stored layers over all keys."""

    def __init__(self, engine: StreamingStatistics):
        self.e = engine
        self._cache: dict[int, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self._rows_counted: set[int] = set()
        self._new_rows = 0

    def take_rows(self) -> int:
        rows, self._new_rows = self._new_rows, 0
        return rows

    def _row_block(self, gi: int, st: _GroupState, r0: int, rows: int, k_lo: int):
        """(log-probs [S, H, b, K] over keys [k_lo, r0+rows), valid rows [b]) for the group's stored layers."""
        cached = self._cache.get(gi)
        if cached is not None and cached[0] == r0 and cached[1] == k_lo:
            return cached[2], cached[3]
        e = self.e
        q, k = e.store.q[gi], e.store.k[gi]
        g = st.group
        k_hi = r0 + rows
        work = e.acc_dtype
        slots, H, _, D = q.shape
        rep = H // e.n_kv
        qb = q[:, :, r0:k_hi].to(work).reshape(slots * e.n_kv, rep * rows, D)
        kb = k[:, :, k_lo:k_hi].to(work).reshape(slots * e.n_kv, k_hi - k_lo, D)
        logits = torch.bmm(qb, kb.transpose(1, 2)).view(slots, H, rows, k_hi - k_lo)
        out = []
        for s in range(slots):
            spec = e.specs[g.first_stored + s]
            x = logits[s] * spec.scaling
            if spec.softcap:
                x = torch.tanh(x / spec.softcap) * spec.softcap
            allowed = self._allowed(spec, r0, rows, k_lo, k_hi, x.device)
            out.append(x.masked_fill(~allowed, float("-inf")))
        logp = masked_log_softmax(torch.stack(out))
        valid = torch.isfinite(logp).any(dim=-1).all(dim=(0, 1))
        self._cache[gi] = (r0, k_lo, logp, valid)
        return logp, valid

    def _allowed(self, spec: LayerSpec, r0: int, rows: int, k_lo: int, k_hi: int, device) -> torch.Tensor:
        n, excl = self.e.n, self.e.exclude_first
        sl = slice(r0, r0 + rows)
        if spec.generic_mask is None:
            allowed = causal_allowed(sl, n, n, k_hi, spec.window, device)[0, 0, :, k_lo:]
        else:
            allowed = spec.inputs.allowed(sl, k_hi)[0, 0, :, k_lo:]
            allowed = allowed.to(device)
        if excl > k_lo:
            allowed = allowed & (torch.arange(k_lo, k_hi, device=device) >= excl)[None, :]
        return allowed

    def emit(self, gi: int, st: _GroupState, seg: Segment, U: torch.Tensor) -> None:
        e = self.e
        g = st.group
        k_lo = self._k_lo(seg.r0)
        logp_all, valid_all = self._row_block(gi, st, seg.r0, seg.rows, k_lo)
        # Every layer of the model must agree on which rows are valid (PairStatistics drops rows where any layer
        # sees no key); for iota masks that is every row >= exclude_first, for generic masks we need all groups.
        valid = self._valid_rows(seg.r0, seg.rows, k_lo, valid_all)
        logp = logp_all[:, :, :, seg.k0 - k_lo: seg.k0 - k_lo + seg.keys]
        logp = torch.where(valid[None, None, :, None], logp, torch.full_like(logp, float("-inf")))
        visible = torch.isfinite(logp)
        probs = torch.exp(logp)
        y = torch.where(visible, logp, torch.zeros_like(logp))
        full_logp = logp_all[:, :, valid]
        norm = torch.exp(full_logp).norm(dim=-1).clamp_min(torch.finfo(e.acc_dtype).tiny)  # [S, H, b_valid]
        row_norm = torch.ones(logp.shape[:3], dtype=logp.dtype, device=logp.device)
        row_norm[:, :, valid] = norm
        xr = probs / row_norm[..., None]
        out = slice(g.halo, None)  # the halo layer is only there for JS
        lo, hi = g.start * e.n_heads, g.stop * e.n_heads
        n_out = (g.stop - g.start) * e.n_heads
        sl = slice(seg.offset, seg.offset + seg.elements)
        scale = e.out_scale
        U[0, lo:hi, sl] = (xr[out] * scale).reshape(n_out, -1).to(U.dtype)
        U[1, lo:hi, sl] = (probs[out] * scale).reshape(n_out, -1).to(U.dtype)
        U[2, lo:hi, sl] = y[out].reshape(n_out, -1).to(U.dtype)
        if U.shape[0] > 3:
            U[3, lo:hi, sl] = (~visible[out]).reshape(n_out, -1).to(U.dtype)
        st.neg_entropy[lo:hi] += (probs[out] * y[out]).sum(dim=(-1, -2)).reshape(-1).to(e.acc_dtype)
        if logp.shape[0] > 1:
            js = js_divergence(logp[:-1], logp[1:]).sum(dim=-1)  # [S-1, H] summed over rows and keys
            a = g.first_stored * e.n_heads
            st.js[a: a + js.numel()] += js.reshape(-1).to(e.acc_dtype)
        if gi == 0 and (seg.r0 not in self._rows_counted):
            self._rows_counted.add(seg.r0)
            self._new_rows += int(valid.sum())

    def _k_lo(self, r0: int) -> int:
        e = self.e
        for unit in e.units:
            for seg in unit:
                if seg.r0 == r0:
                    return seg.k0
        raise KeyError(r0)

    def _valid_rows(self, r0: int, rows: int, k_lo: int, own: torch.Tensor) -> torch.Tensor:
        e = self.e
        if not e.generic or len(e.states) == 1:
            return own
        valid = own
        for gi, st in enumerate(e.states):
            _, v = self._row_block(gi, st, r0, rows, k_lo)
            valid = valid & v.to(own.device)
        return valid


# ----- triton kernels -------------------------------------------------------------------------------------------
_TRITON: Any = None
_TRITON_ERROR: str | None = None


def _triton_ok() -> bool:
    try:
        _triton_kernels()
        return True
    except Exception as exc:  # noqa: BLE001 - any import/compile problem means "use torch"
        global _TRITON_ERROR
        _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
        return False


def _triton_kernels():
    global _TRITON
    if _TRITON is None:
        from . import _stream_kernels

        _TRITON = _stream_kernels
    return _TRITON


# ----- the entry point ------------------------------------------------------------------------------------------------
def stream_sequence_stats(model, input_ids: torch.Tensor, *, exclude_first: int = 0,
                          operand_dtype: torch.dtype | None = None, block_rows: int | None = None,
                          memory_fraction: float = 0.8, return_logits: bool = False,
                          backend: str = "auto", check_memory: bool = True, timings: dict | None = None,
                          engine_options: dict | None = None) -> tuple[SequenceStats, torch.Tensor | None]:
    """All pairwise attention statistics of one sequence `input_ids` [1, n] in one forward plus streamed products.

    Returns the same `SequenceStats` as `metrics.sequence_stats_from_maps` on the model's attention maps, and the
    logits when `return_logits` (else None; the forward then computes only the last position's logits).
    Raises `UserError` before any work when the run cannot fit in GPU memory. `engine_options` are passed to
    `StreamingStatistics` (tuning knobs: tile, stats_tile, gram, tri_chunks, overlap, unit_elements).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, n], got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    store = QKStore.for_model(model)
    plans = []
    if check_memory:
        from .loading import describe

        info = describe(model, "model", "model", "loaded")
        for g in store.groups:
            if g.device.type == "cuda":
                share = _share(info, g.n_layers + g.halo)
                plans.append(check_fits(share, n, g.device, operand_dtype=operand_dtype, block_rows=block_rows,
                                        memory_fraction=memory_fraction))
    embed_device = model.get_input_embeddings().weight.device
    ev = _Events(timings, store.groups[0].device)
    ev.mark("start")
    with torch.no_grad(), capture_attention(model, store):
        kwargs: dict[str, Any] = {"use_cache": False}
        if not return_logits:
            kwargs["logits_to_keep"] = 1
        try:
            out = model(input_ids=input_ids.to(embed_device), **kwargs)
        except TypeError:
            kwargs.pop("logits_to_keep", None)
            out = model(input_ids=input_ids.to(embed_device), **kwargs)
    logits = out.logits if return_logits else None
    del out
    store.finish()
    ev.mark("forward")
    unit_elements = min(p.unit_elements for p in plans) if plans else None
    key_chunk = min(p.key_chunk for p in plans) if plans else None
    with torch.no_grad():
        options = dict(block_rows=block_rows, key_chunk=key_chunk, unit_elements=unit_elements)
        options.update(engine_options or {})
        engine = StreamingStatistics(store, exclude_first=exclude_first, operand_dtype=operand_dtype,
                                     backend=backend, **options)
        stats = engine.run()
    ev.mark("metrics")
    store.release()
    ev.finish()
    return stats, logits


def _share(info: Any, n_layers: int) -> Any:
    """A copy of `info` with only `n_layers` layers (the part of the model on one device)."""
    import copy

    share = copy.copy(info)
    share.n_layers = n_layers
    return share


class _Events:
    """Optional wall-clock marks (CUDA-synchronised) into a dict: forward and metrics seconds."""

    def __init__(self, out: dict | None, device: torch.device):
        self.out, self.device, self.t = out, device, {}

    def mark(self, name: str) -> None:
        if self.out is None:
            return
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t[name] = time.perf_counter()

    def finish(self) -> None:
        if self.out is None:
            return
        self.out["forward_s"] = self.t["forward"] - self.t["start"]
        self.out["metrics_s"] = self.t["metrics"] - self.t["forward"]
