"""Triton kernels of the streaming engine (imported only when Triton is available; see `streaming.py`).

Tensors: Q `[S, Hq, n, D]` and K `[S, Hkv, n, D]` (S stored layers of one device group, model dtype), per stored
layer WIN (int32 window, 0 = none), SCALE and CAP (fp32 softcap, 0 = none); LSE/LSE2 `[S * Hq, n]` fp32.

`row_stats`: for every stored (layer, head) and query row, lse = log sum_j exp(s_ij) and
lse2 = log sqrt(sum_j exp(2 s_ij)), so that P = exp(s - lse) and P / |P_row| = exp(s - lse2). Online over key
tiles, like a flash-attention forward without V.

`emit`: one program per (row tile, key tile, head) of a segment; it loops over the stored layers, recomputes the
logits tile, writes Xr, X (both times `out_scale`) and Y = log P into the operand planes U[0..2] at the segment's
element offset, adds sum P log P to NEGENT and, with the previous layer's tile still in registers, the
Jensen-Shannon divergence of adjacent layers to JS. The halo layer (slot 0 of a group that does not start at
layer 0) only feeds JS. Compile-time variants (all tested against the maps path): MATH 1/2 (see `emit`), ROWSUM
(per-row partial sums, no block-wide reductions in the layer loop). Measured on an H100 (Llama-2-7B shape, 4096
tokens): MATH 2 + ROWSUM 55 ms, MATH 1 73-75 ms (register spills); int64 per-element offsets cost ~2x (spills),
hence the int32 offsets inside a tile from an int64 corner.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def row_stats(Q, K, WIN, SCALE, CAP, LSE, LSE2,
              sq0, sq1, sq2, sk0, sk1, sk2,
              n, row0, excl,
              HQ: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_lh = tl.program_id(1)
    layer = pid_lh // HQ
    h = pid_lh % HQ
    kh = h // REP
    first = row0 + pid_m * BM
    rows = first + tl.arange(0, BM)
    row_ok = rows < n
    dd = tl.arange(0, DP)
    q_base = Q + layer.to(tl.int64) * sq0 + h.to(tl.int64) * sq1
    q = tl.load(q_base + rows[:, None].to(tl.int64) * sq2 + dd[None, :],
                mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    k_base = K + layer.to(tl.int64) * sk0 + kh.to(tl.int64) * sk1
    win = tl.load(WIN + layer)
    scale = tl.load(SCALE + layer)
    cap = tl.load(CAP + layer)
    lo = tl.where(win > 0, tl.maximum(first - win + 1, excl), excl)
    lo = (lo // BN) * BN
    hi = tl.minimum(first + BM, n)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    l2_i = tl.zeros([BM], tl.float32)
    for start in range(lo, hi, BN):
        keys = start + tl.arange(0, BN)
        kt = tl.load(k_base + keys[None, :].to(tl.int64) * sk2 + dd[:, None],
                     mask=(keys[None, :] < n) & (dd[:, None] < D), other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * scale
        if SOFTCAP:
            s = cap * _tanh(s / cap)
        valid = (keys[None, :] <= rows[:, None]) & (keys[None, :] >= excl) & (keys[None, :] < n)
        valid = valid & ((win <= 0) | (keys[None, :] > rows[:, None] - win))
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        l2_i = l2_i * alpha * alpha + tl.sum(p * p, 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    lse2 = m_i + 0.5 * tl.log(l2_i)
    out = pid_lh.to(tl.int64) * n + rows
    tl.store(LSE + out, lse, mask=row_ok)
    tl.store(LSE2 + out, lse2, mask=row_ok)


@triton.jit
def emit(Q, K, WIN, SCALE, CAP, LSE, LSE2, U, NEGENT, JS,
         sq0, sq1, sq2, sk0, sk1, sk2,
         n, r0, nrows, k0, nkeys, m_off, excl,
         su0, su1, layer0, slots, halo, out_scale,
         HQ: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
         MATH: tl.constexpr, ROWSUM: tl.constexpr):
    """MATH 1: masked exps for P and P/|P_row|; MATH 2: one exp, row factor for P/|P_row|, where-free JS.
    ROWSUM False: NEGENT [L*H] and JS [(L-1)*H] get one atomic per tile (block-wide reductions);
    ROWSUM True: NEGENT [L*H, n] and JS [(L-1)*H, n] get per-row partial sums (row reductions only)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    kh = h // REP
    rl = pid_m * BM + tl.arange(0, BM)
    kl = pid_n * BN + tl.arange(0, BN)
    rows = r0 + rl
    keys = k0 + kl
    row_ok = rl < nrows
    key_ok = kl < nkeys
    inside = row_ok[:, None] & key_ok[None, :]
    base_valid = inside & (keys[None, :] <= rows[:, None]) & (keys[None, :] >= excl)
    dd = tl.arange(0, DP)
    q_offs = h.to(tl.int64) * sq1 + rows[:, None].to(tl.int64) * sq2 + dd[None, :]
    q_mask = row_ok[:, None] & (dd[None, :] < D)
    k_offs = kh.to(tl.int64) * sk1 + keys[None, :].to(tl.int64) * sk2 + dd[:, None]
    k_mask = key_ok[None, :] & (dd[:, None] < D)
    tile0 = m_off + (pid_m * BM).to(tl.int64) * nkeys + pid_n * BN  # element offset of the tile's corner
    out_offs = (rl - pid_m * BM)[:, None] * nkeys + (kl - pid_n * BN)[None, :]  # int32 within the tile
    prev_x = tl.zeros([BM, BN], tl.float32)
    prev_y = tl.zeros([BM, BN], tl.float32)
    for si in range(0, slots):
        s64 = tl.cast(si, tl.int64)
        q = tl.load(Q + s64 * sq0 + q_offs, mask=q_mask, other=0.0)
        kt = tl.load(K + s64 * sk0 + k_offs, mask=k_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * tl.load(SCALE + si)
        if SOFTCAP:
            cap = tl.load(CAP + si)
            s = cap * _tanh(s / cap)
        win = tl.load(WIN + si)
        valid = base_valid & ((win <= 0) | (keys[None, :] > rows[:, None] - win))
        lrow = (s64 * HQ + h) * n + rows
        lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)
        lse2 = tl.load(LSE2 + lrow, mask=row_ok, other=0.0)
        if MATH == 1:
            y = tl.where(valid, s - lse[:, None], 0.0)
            x = tl.where(valid, tl.exp(y), 0.0)
            xr = tl.where(valid, tl.exp(s - lse2[:, None]), 0.0)
        else:
            y = tl.where(valid, s - lse[:, None], float("-inf"))
            x = tl.exp(y)  # 0 where masked
            y = tl.where(valid, y, 0.0)
            xr = x * tl.exp(lse - lse2)[:, None]
        if si >= halo:
            row = (layer0 + s64) * HQ + h
            ptr = U + row * su1 + tile0 + out_offs
            tl.store(ptr, (xr * out_scale).to(U.dtype.element_ty), mask=inside)
            tl.store(ptr + su0, (x * out_scale).to(U.dtype.element_ty), mask=inside)
            tl.store(ptr + 2 * su0, y.to(U.dtype.element_ty), mask=inside)
            if ROWSUM:
                tl.atomic_add(NEGENT + row * n + rows, tl.sum(x * y, 1), mask=row_ok)
            else:
                tl.atomic_add(NEGENT + row, tl.sum(tl.sum(x * y, 1), 0))
        if si > 0:
            if MATH == 1:
                mix = prev_x + x
                lm = tl.where(mix > 0, tl.log(0.5 * mix), 0.0)
                t = tl.where(prev_x > 0, prev_x * (prev_y - lm), 0.0) + tl.where(x > 0, x * (y - lm), 0.0)
            else:
                lm = tl.log(tl.maximum(0.5 * (prev_x + x), 1e-30))
                t = prev_x * (prev_y - lm) + x * (y - lm)
            pair = (layer0 + s64 - 1) * HQ + h
            if ROWSUM:
                tl.atomic_add(JS + pair * n + rows, 0.5 * tl.sum(t, 1), mask=row_ok)
            else:
                tl.atomic_add(JS + pair, 0.5 * tl.sum(tl.sum(t, 1), 0))
        prev_x = x
        prev_y = y
