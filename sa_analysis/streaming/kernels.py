"""Triton kernels of the streaming engine (imported only when Triton is available; see `engine.triton_kernels`).

Tensors: Q `[S, Hq, n, D]` and K `[S, Hkv, n, D]` (S stored layers of one device group, model dtype, any
strides), per stored layer WIN (int32 window, 0 = none), SCALE and CAP (fp32 softcap, 0 = none); LSE/LSE2 `[S * Hq, n]` fp32.

Both kernels work in base 2 (logits times log2(e)), so that every exponential and logarithm is one hardware
instruction (ex2, lg2) without a multiply: LSE, Y, NEGENT and JS below are in bits; the engine multiplies by ln 2.

Rows: a run over all rows indexes queries, LSE, NEGENT and JS by the row's position (`nr` = n); a SAMPLED run
keeps only the sampled rows, indexes those arrays by the compact row index (`nr` = rows kept) and reads each row's
position from ROWPOS `[nr]` int32 for the masks (a tile's earliest and latest row bound its keys and decide whether
it may take the mask-free path).

`row_stats`: for every stored (layer, head) and query row, lse = log2 sum_j 2^(s_ij) and
lse2 = log2 sqrt(sum_j 2^(2 s_ij)), so that P = 2^(s - lse) and P / |P_row| = 2^(s - lse2). Online over key
tiles, like a flash-attention forward without V.

`emit`: one program per (row tile, key tile, head) of a segment; it loops over the stored layers, recomputes the
logits tile, writes Xr, X (both times `out_scale`) and Y = log2 P into the operand planes U[0..2] at the segment's
element offset, adds the per-row sums of P log2 P to NEGENT `[L*H, n]` and of the Jensen-Shannon terms of adjacent
layers to JS `[(L-1)*H, n]`. The halo layer (slot 0 of a group that does not start at layer 0) only feeds JS.
The per-row sums go in with relaxed atomics: the default (acq_rel) makes every thread wait until its operand
stores are visible, once per layer.

Both kernels take a mask-free path for tiles that lie wholly inside the causal (and window) region and inside the
segment, which is all but the diagonal and window-edge tiles: no index compares, no `where`, unmasked (vectorised)
stores. Loads stay unconditional (masks constant along the head dimension, so still vectorised): a load inside an
`if` is not pipelined by Triton, which cost more than the masks.

JS of adjacent layers a, b per element is a log a + b log b - (a + b) log((a + b) / 2); the first two terms are
the P log P sums already kept for the entropies, so only the last one is computed per element and no log P tile
of the previous layer is carried (fewer registers; see benchmarks/README.md for the measurements).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    t = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _logits(q, kt, scale, cap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """[BM, BN] fp32 scaled (and soft-capped) logits in bits of a query tile q [BM, DP] and a key tile kt [DP, BN]."""
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    if SOFTCAP:
        s = (cap * LOG2E) * _tanh(s * (scale / cap))
    else:
        s = s * (scale * LOG2E)
    return s


@triton.jit
def _positions(ROWPOS, ci, first_ci, row_ok, n, BM: tl.constexpr, SAMPLED: tl.constexpr):
    """(positions [BM], earliest, latest) of a tile's rows from their compact indices `ci`: the indices themselves,
    or, SAMPLED, the positions in ROWPOS (a tile may straddle two replicates, so they are not sorted: min and max)."""
    if SAMPLED:
        rows = tl.load(ROWPOS + ci, mask=row_ok, other=0)
        first = tl.min(tl.where(row_ok, rows, n), 0)
        last = tl.max(tl.where(row_ok, rows, 0), 0)
    else:
        rows = ci
        first = first_ci
        last = first_ci + BM - 1
    return rows, first, last


@triton.jit
def _stats_step(q, k_base, start, rows, m_i, l_i, l2_i, n, excl, win, scale, cap, sk2,
                DP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online log-sum-exp of P and of P^2; MASKED False for tiles wholly inside the mask."""
    keys = start + tl.arange(0, BN)
    dd = tl.arange(0, DP)
    k_ptr = k_base + tl.cast(start, tl.int64) * sk2 + (tl.arange(0, BN)[None, :] * sk2 + dd[:, None])
    if MASKED:
        kt = tl.load(k_ptr, mask=(keys[None, :] < n) & (dd[:, None] < D), other=0.0)
    elif DP == D:
        kt = tl.load(k_ptr)
    else:
        kt = tl.load(k_ptr, mask=dd[:, None] < D, other=0.0)
    s = _logits(q, kt, scale, cap, SOFTCAP, IEEE)
    if MASKED:
        valid = (keys[None, :] <= rows[:, None]) & (keys[None, :] >= excl) & (keys[None, :] < n)
        valid = valid & ((win <= 0) | (keys[None, :] > rows[:, None] - win))
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    l2_i = l2_i * alpha * alpha + tl.sum(p * p, 1)
    return m_new, l_i, l2_i


@triton.jit
def row_stats(Q, K, WIN, SCALE, CAP, LSE, LSE2, ROWPOS,
              sq0, sq1, sq2, sk0, sk1, sk2,
              n, row0, excl, nr,
              HQ: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
              SAMPLED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_lh = tl.program_id(1)
    layer = pid_lh // HQ
    h = pid_lh % HQ
    kh = h // REP
    first_ci = row0 + pid_m * BM  # compact row index: the position itself unless SAMPLED
    ci = first_ci + tl.arange(0, BM)
    row_ok = ci < nr
    rows, first, last = _positions(ROWPOS, ci, first_ci, row_ok, n, BM, SAMPLED)
    dd = tl.arange(0, DP)
    q_base = Q + layer.to(tl.int64) * sq0 + h.to(tl.int64) * sq1
    q = tl.load(q_base + ci[:, None].to(tl.int64) * sq2 + dd[None, :],
                mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    k_base = K + layer.to(tl.int64) * sk0 + kh.to(tl.int64) * sk1
    win = tl.load(WIN + layer)
    scale = tl.load(SCALE + layer)
    cap = tl.load(CAP + layer)
    lo = tl.where(win > 0, tl.maximum(first - win + 1, excl), excl)
    lo = (lo // BN) * BN
    hi = tl.minimum(last + 1, n)
    # key tiles [lo, b) and [c, hi) need masks (window edge, excluded keys, diagonal); [b, c) are wholly valid
    full_lo = tl.maximum(excl, tl.where(win > 0, last - win + 1, 0))
    full_lo = (full_lo + BN - 1) // BN * BN
    full_hi = (first + 1) // BN * BN
    b = tl.minimum(tl.maximum(full_lo, lo), hi)
    c = tl.minimum(tl.maximum(full_hi, b), hi)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    l2_i = tl.zeros([BM], tl.float32)
    for start in range(lo, b, BN):
        m_i, l_i, l2_i = _stats_step(q, k_base, start, rows, m_i, l_i, l2_i, n, excl, win, scale, cap, sk2,
                                     DP, D, BN, True, SOFTCAP, IEEE)
    for start in range(b, c, BN):
        m_i, l_i, l2_i = _stats_step(q, k_base, start, rows, m_i, l_i, l2_i, n, excl, win, scale, cap, sk2,
                                     DP, D, BN, False, SOFTCAP, IEEE)
    for start in range(c, hi, BN):
        m_i, l_i, l2_i = _stats_step(q, k_base, start, rows, m_i, l_i, l2_i, n, excl, win, scale, cap, sk2,
                                     DP, D, BN, True, SOFTCAP, IEEE)
    lse = m_i + tl.math.log2(l_i)
    lse2 = m_i + 0.5 * tl.math.log2(l2_i)
    out = pid_lh.to(tl.int64) * nr + ci
    tl.store(LSE + out, lse, mask=row_ok)
    tl.store(LSE2 + out, lse2, mask=row_ok)


@triton.jit
def emit(Q, K, WIN, SCALE, CAP, LSE, LSE2, U, NEGENT, JS, ROWPOS,
         sq0, sq1, sq2, sk0, sk1, sk2,
         n, r0, nrows, k0, nkeys, m_off, excl, nr,
         su0, su1, layer0, slots, halo, out_scale,
         HQ: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, SAMPLED: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    h = tl.program_id(2)
    kh = h // REP
    rl = pid_m * BM + tl.arange(0, BM)
    kl = pid_n * BN + tl.arange(0, BN)
    ci = r0 + rl  # compact row index (the position itself unless SAMPLED): rows of Q, LSE, NEGENT, JS
    keys = k0 + kl
    row_ok = rl < nrows
    key_ok = kl < nkeys
    first_ci = r0 + pid_m * BM
    rows, first_row, last_row = _positions(ROWPOS, ci, first_ci, row_ok, n, BM, SAMPLED)
    first_key = k0 + pid_n * BN
    # the tile lies inside the segment (unmasked loads/stores) and, for a causal mask, wholly at or below it
    in_segment = (pid_m * BM + BM <= nrows) & (pid_n * BN + BN <= nkeys)
    below = in_segment & (first_key + BN - 1 <= first_row) & (first_key >= excl)
    dd = tl.arange(0, DP)
    q_head = Q + h.to(tl.int64) * sq1 + first_ci.to(tl.int64) * sq2  # scalar pointers: the tile's corner
    k_head = K + kh.to(tl.int64) * sk1 + first_key.to(tl.int64) * sk2
    q_offs = tl.arange(0, BM)[:, None] * sq2 + dd[None, :]  # int32 within the tile
    k_offs = tl.arange(0, BN)[None, :] * sk2 + dd[:, None]
    if DP == D:  # row/key masks only: constant along the head dimension, so the loads stay vectorised
        q_mask = row_ok[:, None]
        k_mask = key_ok[None, :]
    else:
        q_mask = row_ok[:, None] & (dd[None, :] < D)
        k_mask = key_ok[None, :] & (dd[:, None] < D)
    tile0 = m_off + (pid_m * BM).to(tl.int64) * nkeys + pid_n * BN  # element offset of the tile's corner
    out_offs = tl.arange(0, BM)[:, None] * nkeys + tl.arange(0, BN)[None, :]  # int32 within the tile
    prev_x = tl.zeros([BM, BN], tl.float32)
    prev_xy = tl.zeros([BM], tl.float32)
    for si in range(0, slots):
        s64 = tl.cast(si, tl.int64)
        # unconditional loads: the compiler pipelines them (prefetches the next layer's tiles)
        q = tl.load(q_head + s64 * sq0 + q_offs, mask=q_mask, other=0.0)
        kt = tl.load(k_head + s64 * sk0 + k_offs, mask=k_mask, other=0.0)
        s = _logits(q, kt, tl.load(SCALE + si), tl.load(CAP + si), SOFTCAP, IEEE)
        win = tl.load(WIN + si)
        lrow = (s64 * HQ + h) * nr + ci
        lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)
        lse2 = tl.load(LSE2 + lrow, mask=row_ok, other=0.0)
        if below & ((win <= 0) | (first_key > last_row - win)):
            y = s - lse[:, None]
            x = tl.math.exp2(y)
        else:
            valid = row_ok[:, None] & key_ok[None, :] & (keys[None, :] <= rows[:, None]) & (keys[None, :] >= excl)
            valid = valid & ((win <= 0) | (keys[None, :] > rows[:, None] - win))
            y = tl.where(valid, s - lse[:, None], float("-inf"))
            x = tl.math.exp2(y)  # 0 where masked
            y = tl.where(valid, y, 0.0)
        xy = tl.sum(x * y, 1)  # [BM] sum of P log2 P over the tile's keys
        if si >= halo:
            row = (layer0 + s64) * HQ + h
            ptr = U + row * su1 + tile0 + out_offs
            xr = x * (tl.math.exp2(lse - lse2) * out_scale)[:, None]
            if in_segment:
                tl.store(ptr, xr.to(U.dtype.element_ty))
                tl.store(ptr + su0, (x * out_scale).to(U.dtype.element_ty))
                tl.store(ptr + 2 * su0, y.to(U.dtype.element_ty))
            else:
                inside = row_ok[:, None] & key_ok[None, :]
                tl.store(ptr, xr.to(U.dtype.element_ty), mask=inside)
                tl.store(ptr + su0, (x * out_scale).to(U.dtype.element_ty), mask=inside)
                tl.store(ptr + 2 * su0, y.to(U.dtype.element_ty), mask=inside)
            tl.atomic_add(NEGENT + row * nr + ci, xy, mask=row_ok, sem="relaxed")
        if si > 0:
            mix = prev_x + x
            mixed = tl.sum(mix * tl.math.log2(tl.maximum(0.5 * mix, 1e-30)), 1)
            pair = (layer0 + s64 - 1) * HQ + h
            tl.atomic_add(JS + pair * nr + ci, 0.5 * (prev_xy + xy - mixed), mask=row_ok, sem="relaxed")
        prev_x = x
        prev_xy = xy
