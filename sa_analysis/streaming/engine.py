"""The streaming engine: row statistics, operands and Gram products of every (layer, head) pair (see the package
docstring for the method)."""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Sequence

import torch

from ..metrics import SequenceStats
from .memory import (OPERAND_SCALE_FP16, TRITON_BM, TRITON_BN, Segment, default_operand_dtype, operand_bytes,
                     plan_segments, round_up)
from .sampling import RowSample, jackknife
from .store import QKStore
from .products import mm32
from .state import GroupState
from .torch_backend import TorchEmitter




# ----- the engine ------------------------------------------------------------------------------------------------
class StreamingStatistics:
    """Computes `SequenceStats` from a filled `QKStore` (see the module docstring for the method).

    Tuning knobs (defaults measured best on an H100 at Llama-2-7B shape, see benchmarks/README.md; on an H200 one
    unit's products took 0.94-0.99 ms with `tri_chunks` 2 or 4 in two runs, either one ahead, and 1.40 ms with 8):
    `block_rows`/`key_chunk`/`unit_elements` cut the causal plane into segments and units; `gram` is "tri"
    (upper block-triangle of the symmetric products, `tri_chunks` row chunks), "full" or "splitk"; `tile` is the
    emit kernel's (rows, keys, warps[, pipeline stages[, register cap]]) and `stats_tile` the row-statistics
    kernel's (rows, keys, warps[, stages]).
    `backend` "auto" uses Triton on CUDA for causal/sliding masks, plain torch otherwise.
    `sample` (a `RowSample`, with a store that kept only its rows) estimates every statistic from those rows and
    adds a jackknife standard error per entry (`SequenceStats.se`).
    """

    def __init__(self, store: QKStore, *, exclude_first: int = 0, sample: RowSample | None = None,
                 operand_dtype: torch.dtype | None = None,
                 block_rows: int | None = None, key_chunk: int | None = None, unit_elements: int | None = None,
                 backend: str = "auto", gram: str = "auto", tri_chunks: int = 2,
                 tile: tuple[int, ...] = (TRITON_BM, TRITON_BN, 4, 2), stats_tile: tuple[int, ...] = (128, 64, 4),
                 profile: bool = False):
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
        self.sample = sample
        self._check_sample(sample)
        self.parts = sample.parts if sample else [self.n - self.exclude_first]  # rows of each part's own sums
        self.nr = sample.rows if sample else self.n  # length of the row axis of queries and per-row arrays
        windows = [s.window for s in self.specs]
        self.windows = windows
        self.support_gram = self.generic  # iota masks: support decided from the windows
        on_cuda = all(g.device.type == "cuda" for g in store.groups)
        if backend == "auto":
            fast_dtype = self.model_dtype in (torch.bfloat16, torch.float16, torch.float32)
            backend = "triton" if (on_cuda and fast_dtype and not self.generic and triton_kernels() is not None) else "torch"
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
        self.compiled: dict[str, Any] = {}
        rows = block_rows or (128 if backend == "triton" else 64)
        if backend == "triton":
            rows = round_up(rows, self.bm)
        self.block_rows = rows
        align = self.bn if backend == "triton" else 1
        elements = unit_elements or max(operand_bytes(primary) // (3 * self.N * self.operand_dtype.itemsize),
                                        rows * align)
        chunk = key_chunk or max(align, (elements // rows) // align * align)
        self.key_chunk = round_up(min(chunk, self.n), align)
        self.unit_elements = max(elements, rows * self.key_chunk)
        positions = sample.flat().numpy() if sample else None
        self.units = plan_segments(self.n, self.exclude_first, windows, rows, self.key_chunk, self.unit_elements,
                                   positions=positions, parts=self.parts)
        self.states = [GroupState(g, self.N, self.n_layers, self.n_heads, self.acc_dtype, self.support_gram,
                                  len(self.parts)) for g in store.groups]
        self.rows_per_part = [0] * len(self.parts)  # valid query rows counted into each part's sums
        self.profile = profile and on_cuda
        self.timings: dict[str, float] = {}
        self._events: dict[str, list] = {}

    def _check_sample(self, sample: RowSample | None) -> None:
        """A sampled run needs the store to have kept exactly the sample's rows, and causal/sliding masks."""
        kept = self.store.rows
        if sample is None:
            if kept is not None:
                raise ValueError("the store kept only some query rows; pass the RowSample they came from")
            return
        if self.generic:
            raise ValueError("sampled rows need causal or sliding-window masks (this sequence has a padding mask)")
        if kept is None or not torch.equal(kept.cpu(), sample.flat()):
            raise ValueError("the store must keep exactly the sampled rows: QKStore.for_model(model, rows=sample.flat())")
        if sample.n != self.n or sample.exclude_first != self.exclude_first:
            raise ValueError(f"the sample was drawn for {sample.n} tokens and exclude_first={sample.exclude_first}, "
                             f"the run has {self.n} and {self.exclude_first}")

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
            self.rows_per_part = list(self.parts)  # every row of a causal/sliding mask sees a key
        emitter = None if self.backend == "triton" else TorchEmitter(self)
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
            self._exchange(m, planes)
            self._event("emit", False)
            self._event("gemm", True)
            for st in self.states:
                U = st.buffer[: planes * self.N * m].view(planes, self.N, m)
                self._accumulate(st, U, unit[0].part)
            self._event("gemm", False)
        return self._finish()

    def _finish(self) -> SequenceStats:
        for st in self.states:
            st.buffer = None
            rows = getattr(st, "neg_entropy_rows", None)
            if rows is not None:  # the Triton kernels' per-row sums, in bits, folded per part
                st.neg_entropy += self._fold_rows(rows).to(st.neg_entropy.dtype) * math.log(2)
                st.js += self._fold_rows(st.js_rows).to(st.js.dtype) * math.log(2)
                st.neg_entropy_rows = st.js_rows = None
        self._event("result", True)
        result = self._result()
        self._event("result", False)
        self._collect_timings()
        return result

    def _fold_rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """[X, nr] per-row sums -> [parts, X] sums over each part's rows (all rows from exclude_first: one part)."""
        if self.sample is None:
            return per_row[:, self.exclude_first:].sum(dim=1)[None]
        return torch.stack([chunk.sum(dim=1) for chunk in per_row.split(self.parts, dim=1)])

    def _exchange(self, m: int, planes: int) -> None:
        """Copy each group's operand rows into the other groups' buffers (several devices only)."""
        if len(self.states) == 1:
            return
        views = [st.buffer[: planes * self.N * m].view(planes, self.N, m) for st in self.states]
        for si, src in enumerate(self.states):
            for di, dst in enumerate(self.states):
                if si != di:
                    views[di][:, src.rows].copy_(views[si][:, src.rows])

    def _accumulate(self, st: GroupState, U: torch.Tensor, part: int) -> None:
        """Add one unit's Gram products into the sums of `part`."""
        N = self.N
        m = U.shape[-1]
        acc_xy, acc_r, acc_s = st.acc_xy[part], st.acc_r[part], None
        if st.acc_s is not None:
            acc_s = st.acc_s[part]
        Xr, X = U[0], U[1]
        XY = U[1:3].reshape(2 * N, m)
        if self.gram == "splitk" and m % self.tri_chunks == 0:
            S, ms = self.tri_chunks, m // self.tri_chunks
            A = X[st.rows].reshape(-1, S, ms).transpose(0, 1)  # [S, rows, ms] (views)
            B = XY.view(2 * N, S, ms).permute(1, 2, 0)  # [S, ms, 2N]
            acc_xy += _bmm32(A, B, self.acc_dtype).sum(0)
            Ar = Xr[st.rows].reshape(-1, S, ms).transpose(0, 1)
            Br = Xr.view(N, S, ms).permute(1, 2, 0)
            acc_r += _bmm32(Ar, Br, self.acc_dtype).sum(0)
        elif self.gram == "tri":
            bounds = _chunk_bounds(N, self.tri_chunks)
            for a, b in bounds:
                acc_xy[a:b, a:] += mm32(X[a:b], XY[a:].T, self.acc_dtype)
                acc_r[a:b, a:] += mm32(Xr[a:b], Xr[a:].T, self.acc_dtype)
        else:
            acc_xy += mm32(X[st.rows], XY.T, self.acc_dtype)
            acc_r += mm32(Xr[st.rows], Xr.T, self.acc_dtype)
        if acc_s is not None:
            acc_s += mm32(X[st.rows], U[3].T, self.acc_dtype)

    # -- result
    def _result(self) -> SequenceStats:
        """Normalise the sums into the statistics; a sampled run adds jackknife standard errors over replicates."""
        sums, miss = self._sums()
        estimate = lambda summed: self._estimate(summed, miss)  # noqa: E731
        if self.sample is None:
            out, se = estimate({k: v[0] for k, v in sums.items()}), None
        else:
            out, se = estimate(self.sample.combine(sums)), jackknife(self.sample, sums, estimate)
        return SequenceStats(
            cosine_flat=out["cosine_flat"], cosine_row=out["cosine_row"], kl=out["kl"], entropy=out["entropy"],
            js_adjacent=out["js_adjacent"], n_rows=int(sum(self.rows_per_part)), se=se,
            sampling=self.sample.describe() if self.sample is not None else None,
        )

    def _sums(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(per-part sums on the first group's device, with a leading part axis; [N, N] bool support miss).

        The Gram sums are unscaled here (operand scale, bits -> nats) and symmetric products filled in below."""
        N = self.N
        out_dev = self.states[0].group.device
        gather = lambda t: t.to(out_dev)  # noqa: E731
        acc_xy = torch.cat([gather(st.acc_xy) for st in self.states], dim=1)  # [R, N, 2N]
        acc_r = torch.cat([gather(st.acc_r) for st in self.states], dim=1)  # [R, N, N]
        gram, cross = acc_xy[:, :, :N], acc_xy[:, :, N:]
        if self.gram == "tri":
            upper = _block_upper(N, self.tri_chunks, out_dev)
            gram = torch.where(upper, gram, gram.transpose(1, 2))
            acc_r = torch.where(upper, acc_r, acc_r.transpose(1, 2))
        s = self.out_scale
        cross = cross / s
        if self.backend == "triton":  # the kernels write Y = log2 P
            cross = cross * math.log(2)
        if self.support_gram:
            miss = torch.cat([gather(st.acc_s.sum(0)) for st in self.states], dim=0) > 0
        else:
            miss = self._support_miss(out_dev)
        rows = torch.tensor(self.rows_per_part, dtype=self.acc_dtype, device=out_dev)
        sums = dict(gram=gram / (s * s), gram_row=acc_r / (s * s), cross=cross,
                    neg_entropy=sum(gather(st.neg_entropy) for st in self.states),
                    js=sum(gather(st.js) for st in self.states), rows=rows)
        return sums, miss

    def _estimate(self, sums: dict[str, torch.Tensor], miss: torch.Tensor) -> dict[str, torch.Tensor]:
        """The statistics of summed sums (see metrics.py for the definitions), and their head-mean layer matrices."""
        L, H = self.n_layers, self.n_heads
        rows = sums["rows"].clamp_min(1)
        tiny = torch.finfo(self.acc_dtype).tiny
        gram = sums["gram"]
        diag = gram.diagonal().clamp_min(tiny)
        cos_flat = gram / torch.sqrt(diag[:, None] * diag[None, :])
        cross = sums["cross"]
        kl = (cross.diagonal()[:, None] - cross) / rows
        kl = torch.where(miss, torch.full_like(kl, float("inf")), kl).clamp_min(0.0)
        shape = (L, H, L, H)
        out = dict(cosine_flat=cos_flat.reshape(shape), cosine_row=(sums["gram_row"] / rows).reshape(shape),
                   kl=kl.reshape(shape), entropy=(-sums["neg_entropy"] / rows).reshape(L, H),
                   js_adjacent=(sums["js"] / rows).reshape(max(L - 1, 0), H))
        for name in ("cosine_flat", "cosine_row", "kl"):  # index-matched head mean [L, L], as the report keeps it
            out[name + "_layers"] = out[name].diagonal(dim1=1, dim2=3).mean(-1)
        return out

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
    def _layer_arrays(self, st: GroupState):
        g = st.group
        specs = [self.specs[i] for i in range(g.first_stored, g.stop)]
        dev = g.device
        win = torch.tensor([s.window or 0 for s in specs], dtype=torch.int32, device=dev)
        scale = torch.tensor([s.scaling for s in specs], dtype=torch.float32, device=dev)
        cap = torch.tensor([s.softcap or 0.0 for s in specs], dtype=torch.float32, device=dev)
        return win, scale, cap, any(s.softcap for s in specs)

    def _triton_row_stats(self, gi: int, st: GroupState) -> None:
        kernels = triton_kernels()
        q, k = self.store.q[gi], self.store.k[gi]
        slots = q.shape[0]
        nr = self.nr
        st.lse = torch.empty(slots * self.n_heads, nr, dtype=torch.float32, device=q.device)
        st.lse2 = torch.empty_like(st.lse)
        # per-row partial sums of sum P log P and of the JS terms (no block-wide reductions), folded in _finish
        st.neg_entropy_rows = torch.zeros(self.N, nr, dtype=torch.float32, device=q.device)
        st.js_rows = torch.zeros(max(self.n_layers - 1, 0) * self.n_heads, nr, dtype=torch.float32,
                                 device=q.device)
        st.arrays = self._layer_arrays(st)
        st.rowpos = self.store.rows_on(q.device).to(torch.int32) if self.sample is not None else st.lse
        win, scale, cap, softcap = st.arrays
        r0 = 0 if self.sample is not None else self.exclude_first
        bm, bn, warps = self.stats_tile[:3]
        extra = _launch_options(self.stats_tile)
        grid = (triton_cdiv(nr - r0, bm), slots * self.n_heads)
        with _on_device(q.device):
            self.compiled["row_stats"] = kernels.row_stats[grid](
                q, k, win, scale, cap, st.lse, st.lse2, st.rowpos,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                self.n, r0, self.exclude_first, nr,
                HQ=self.n_heads, REP=self.n_heads // self.n_kv, D=self.head_dim,
                DP=_next_pow2(self.head_dim), BM=bm, BN=bn, SOFTCAP=softcap,
                IEEE=q.dtype == torch.float32, SAMPLED=self.sample is not None, num_warps=warps, **extra)

    def _triton_emit(self, gi: int, st: GroupState, seg: Segment, U: torch.Tensor) -> None:
        kernels = triton_kernels()
        q, k = self.store.q[gi], self.store.k[gi]
        win, scale, cap, softcap = st.arrays
        g = st.group
        grid = (triton_cdiv(seg.rows, self.bm), triton_cdiv(seg.keys, self.bn), self.n_heads)
        extra = _launch_options(self.tile)
        with _on_device(q.device):
            self.compiled["emit"] = kernels.emit[grid](
                q, k, win, scale, cap, st.lse, st.lse2, U,
                st.neg_entropy_rows, st.js_rows, st.rowpos,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                self.n, seg.r0, seg.rows, seg.k0, seg.keys, seg.offset, self.exclude_first, self.nr,
                U.stride(0), U.stride(1), g.first_stored, q.shape[0], g.halo, self.out_scale,
                HQ=self.n_heads, REP=self.n_heads // self.n_kv, D=self.head_dim,
                DP=_next_pow2(self.head_dim), BM=self.bm, BN=self.bn, SOFTCAP=softcap,
                IEEE=q.dtype == torch.float32, SAMPLED=self.sample is not None, num_warps=self.warps, **extra)


def _launch_options(tile: Sequence[int]) -> dict[str, int]:
    """Triton launch options from the optional tail of a tile tuple (rows, keys, warps[, stages[, registers]])."""
    return {name: v for name, v in zip(("num_stages", "maxnreg"), tile[3:]) if v}


def _chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    size = round_up(max(1, -(-n // chunks)), 16)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _block_upper(n: int, chunks: int, device) -> torch.Tensor:
    """[n, n] bool: True in the blocks (i, j) with i <= j of the chunking used by the triangular products."""
    size = _chunk_bounds(n, chunks)[0][1]
    idx = torch.arange(n, device=device) // size  # chunk of each row (built on the device: no host copy)
    return idx[:, None] <= idx[None, :]




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


# ----- triton kernels -------------------------------------------------------------------------------------------
log = logging.getLogger(__name__)


@functools.cache
def triton_kernels():
    """The Triton kernels module, or None where Triton cannot be imported or compiled (logged once: the engine then
    runs its torch backend, correct but slower)."""
    try:
        from . import kernels
    except Exception as exc:  # noqa: BLE001 - any import problem means "use torch"
        log.warning("Triton is not usable here (%s: %s); the streaming engine falls back to plain torch.",
                    type(exc).__name__, exc)
        return None
    return kernels
