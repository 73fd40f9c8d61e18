"""The streaming operands in plain torch: on the CPU, for padding (generic) masks, and where Triton is missing."""

from __future__ import annotations

import torch

from ..capture import causal_allowed, masked_log_softmax
from .memory import Segment
from .state import GroupState
from .store import LayerSpec


# ----- torch backend (CPU, generic masks, fallback) ------------------------------------------------------------------
class TorchEmitter:
    """Writes operands with plain torch ops: per row block, the log-probabilities of all stored layers over all keys."""

    def __init__(self, engine):
        """`engine`: the `StreamingStatistics` that owns this emitter (its store, sample, mask and buffers)."""
        self.e = engine
        self._cache: dict[int, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self._rows_counted: set[int] = set()
        self._norms: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.positions = engine.sample.flat() if engine.sample is not None else None

    def _position_range(self, r0: int, rows: int) -> tuple[torch.Tensor | None, int]:
        """(positions [b] of a sampled block or None, the block's last key + 1)."""
        if self.positions is None:
            return None, r0 + rows
        pos = self.positions[r0: r0 + rows]
        return pos, int(pos[-1]) + 1

    def _row_block(self, gi: int, st: GroupState, r0: int, rows: int, k_lo: int):
        """(log-probs [S, H, b, K] over keys [k_lo, last row + 1), valid rows [b]) for the group's stored layers."""
        cached = self._cache.get(gi)
        if cached is not None and cached[0] == r0 and cached[1] == k_lo:
            return cached[2], cached[3]
        e = self.e
        q, k = e.store.q[gi], e.store.k[gi]
        g = st.group
        pos, k_hi = self._position_range(r0, rows)
        work = e.acc_dtype
        slots, H, _, D = q.shape
        rep = H // e.n_kv
        qb = q[:, :, r0:r0 + rows].to(work).reshape(slots * e.n_kv, rep * rows, D)
        kb = k[:, :, k_lo:k_hi].to(work).reshape(slots * e.n_kv, k_hi - k_lo, D)
        logits = torch.bmm(qb, kb.transpose(1, 2)).view(slots, H, rows, k_hi - k_lo)
        out = []
        for s in range(slots):
            spec = e.specs[g.first_stored + s]
            x = logits[s] * spec.scaling
            if spec.softcap:
                x = torch.tanh(x / spec.softcap) * spec.softcap
            allowed = self._allowed(spec, r0, rows, k_lo, k_hi, x.device, pos)
            out.append(x.masked_fill(~allowed, float("-inf")))
        logp = masked_log_softmax(torch.stack(out))
        if e.generic:  # rows where some layer sees no key are dropped everywhere (as PairStatistics does)
            valid = torch.isfinite(logp).any(dim=-1).all(dim=(0, 1))
        else:  # causal/sliding: every row from exclude_first on sees at least itself
            valid = torch.ones(rows, dtype=torch.bool, device=logp.device)
        self._cache[gi] = (r0, k_lo, logp, valid)
        return logp, valid

    def _allowed(self, spec: LayerSpec, r0: int, rows: int, k_lo: int, k_hi: int, device,
                 pos: torch.Tensor | None = None) -> torch.Tensor:
        """[b, K] bool: which keys [k_lo, k_hi) each row of the block may see (rows at `pos` for a sampled block)."""
        n, excl = self.e.n, self.e.exclude_first
        sl = slice(r0, r0 + rows)
        if pos is not None:
            keys = torch.arange(k_lo, k_hi, device=device)
            at = pos.to(device)[:, None]
            allowed = keys[None, :] <= at
            if spec.window is not None:
                allowed = allowed & (keys[None, :] > at - spec.window)
        elif spec.generic_mask is None:
            allowed = causal_allowed(sl, n, n, k_hi, spec.window, device)[0, 0, :, k_lo:]
        else:
            allowed = spec.inputs.allowed(sl, k_hi)[0, 0, :, k_lo:]
            allowed = allowed.to(device)
        if excl > k_lo:
            allowed = allowed & (torch.arange(k_lo, k_hi, device=device) >= excl)[None, :]
        return allowed

    def emit(self, gi: int, st: GroupState, seg: Segment, U: torch.Tensor) -> None:
        e = self.e
        g = st.group
        k_lo = self._k_lo(seg.r0)
        logp_all, valid_all = self._row_block(gi, st, seg.r0, seg.rows, k_lo)
        # Every layer of the model must agree on which rows are valid (PairStatistics drops rows where any layer
        # sees no key); for iota masks that is every row >= exclude_first, for generic masks we need all groups.
        valid = self._valid_rows(seg.r0, seg.rows, k_lo, valid_all)
        logp = logp_all[:, :, :, seg.k0 - k_lo: seg.k0 - k_lo + seg.keys]
        if not bool(valid.all()):
            logp = torch.where(valid[None, None, :, None], logp, torch.full_like(logp, float("-inf")))
        probs = torch.exp(logp)  # [S, H, b, keys], 0 where masked
        y = torch.nan_to_num(logp, neginf=0.0)  # log P, 0 where masked
        xr = probs / self._row_norms(gi, logp_all, valid)[..., None]
        out = slice(g.halo, None)  # the halo layer is only there for JS
        lo, hi = g.start * e.n_heads, g.stop * e.n_heads
        n_out = (g.stop - g.start) * e.n_heads
        sl = slice(seg.offset, seg.offset + seg.elements)
        scale = e.out_scale
        scaled = (lambda t: t) if scale == 1.0 else (lambda t: t * scale)  # noqa: E731
        U[0, lo:hi, sl] = scaled(xr[out]).reshape(n_out, -1).to(U.dtype)
        U[1, lo:hi, sl] = scaled(probs[out]).reshape(n_out, -1).to(U.dtype)
        U[2, lo:hi, sl] = y[out].reshape(n_out, -1).to(U.dtype)
        if U.shape[0] > 3:  # generic masks: the support plane, 1 where masked
            U[3, lo:hi, sl] = torch.isinf(logp[out]).reshape(n_out, -1).to(U.dtype)
        rep = seg.part
        p_log_p = (probs * y).sum(dim=-1)  # [S, H, b]: sum over the segment's keys of P log P
        st.neg_entropy[rep, lo:hi] += p_log_p[out].sum(dim=-1).reshape(-1).to(e.acc_dtype)
        if logp.shape[0] > 1:
            # JS of adjacent layers a, b = (sum a log a + sum b log b - sum (a + b) log((a + b) / 2)) / 2: the first two
            # are the P log P sums above, so one xlogy per element (as the Triton kernel does)
            mix = probs[:-1] + probs[1:]
            js = 0.5 * (p_log_p[:-1] + p_log_p[1:] - torch.special.xlogy(mix, 0.5 * mix).sum(dim=-1))
            a = g.first_stored * e.n_heads
            st.js[rep, a: a + js[..., 0].numel()] += js.sum(dim=-1).reshape(-1).to(e.acc_dtype)
        if gi == 0 and (seg.r0 not in self._rows_counted):
            self._rows_counted.add(seg.r0)
            e.rows_per_part[rep] += int(valid.sum())

    def _row_norms(self, gi: int, logp_all: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[S, H, b] the norm of each row's probabilities over all its keys (1 for invalid rows), once per row block."""
        cached = self._norms.get(gi)
        if cached is not None and cached[0] is logp_all:
            return cached[1]
        e = self.e
        norm = torch.ones(logp_all.shape[:3], dtype=logp_all.dtype, device=logp_all.device)
        norm[:, :, valid] = torch.exp(logp_all[:, :, valid]).norm(dim=-1).clamp_min(torch.finfo(e.acc_dtype).tiny)
        self._norms[gi] = (logp_all, norm)
        return norm

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
