"""Triton kernels of `patch.kernels` and their launchers (imported only where Triton is installed).

Each program handles one (sequence, key/value head) and a contiguous range of keys; the query heads of a group (G of
them, padded to at least 16 rows for `tl.dot`) are the rows of one small matrix product, so a key or value is read
once for the whole group. Head dimensions that are not a power of two are padded and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def scores_kernel(q_ptr, k_ptr, out_ptr, n_kv, n_keys,
                  q_b, q_h, q_g, q_d, k_b, k_h, k_k, k_d, o_b, o_h, o_g, o_k,
                  G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                  TILES: tl.constexpr):
    """scores[b, h, g, k] = sum_d query[b, h, g, d] * key[b, h, k, d] in float32, for one split of the keys (TILES
    blocks of BLOCK keys; the last split's tail is masked)."""
    row, split = tl.program_id(0), tl.program_id(1)
    b, h = row // n_kv, row % n_kv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    query = tl.load(q_ptr + b * q_b + h * q_h + g[:, None] * q_g + d[None, :] * q_d,
                    mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)  # [G_PAD, D_PAD]
    first = split * (TILES * BLOCK)
    for tile in range(TILES):
        k = first + tile * BLOCK + tl.arange(0, BLOCK)
        keys = tl.load(k_ptr + b * k_b + h * k_h + k[:, None] * k_k + d[None, :] * k_d,
                       mask=(k[:, None] < n_keys) & (d[None, :] < D), other=0.0)  # [BLOCK, D_PAD]
        out = tl.dot(query, tl.trans(keys))  # [G_PAD, BLOCK] float32
        tl.store(out_ptr + b * o_b + h * o_h + g[:, None] * o_g + k[None, :] * o_k, out,
                 mask=(g[:, None] < G) & (k[None, :] < n_keys))


@triton.jit
def row_values_kernel(p_ptr, v_ptr, out_ptr, n_kv, n_keys,
                      p_b, p_h, p_g, p_k, v_b, v_h, v_k, v_d, o_b, o_h, o_s, o_g,
                      G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
                      TILES: tl.constexpr):
    """partial[b, h, s, g, :] = sum over split s's keys of row[b, h, g, k] * value[b, h, k, :] (row cast to the
    values' dtype, float32 sums); a split is TILES blocks of BLOCK keys."""
    row, split = tl.program_id(0), tl.program_id(1)
    b, h = row // n_kv, row % n_kv
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    first = split * (TILES * BLOCK)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    for tile in range(TILES):  # the last split's tail is masked
        k = first + tile * BLOCK + tl.arange(0, BLOCK)
        probs = tl.load(p_ptr + b * p_b + h * p_h + g[:, None] * p_g + k[None, :] * p_k,
                        mask=(g[:, None] < G) & (k[None, :] < n_keys), other=0.0)  # [G_PAD, BLOCK]
        values = tl.load(v_ptr + b * v_b + h * v_h + k[:, None] * v_k + d[None, :] * v_d,
                         mask=(k[:, None] < n_keys) & (d[None, :] < D), other=0.0)  # [BLOCK, D_PAD]
        acc += tl.dot(probs.to(values.dtype), values)  # [G_PAD, D_PAD]
    tl.store(out_ptr + b * o_b + h * o_h + split * o_s + g[:, None] * o_g + d[None, :], acc,
             mask=(g[:, None] < G) & (d[None, :] < D))


def _pads(groups: int, dim: int) -> dict:
    return dict(G=groups, G_PAD=max(16, triton.next_power_of_2(groups)), D=dim, D_PAD=max(16, triton.next_power_of_2(dim)))


def scores(query: torch.Tensor, key: torch.Tensor, launch, block: int, keys_per_program: int | None = None,
           **launch_options) -> torch.Tensor:
    """[B, Hkv, G, K] float32 scores of query [B, Hkv, G, D] against key [B, Hkv, K, D] (`launch`: the wrapped kernel;
    each program scores `keys_per_program` keys, a multiple of `block`; default one block)."""
    batch, n_kv, groups, dim = query.shape
    n_keys = key.shape[2]
    keys_per_program = keys_per_program or block
    out = torch.empty(batch, n_kv, groups, n_keys, device=query.device, dtype=torch.float32)
    grid = (batch * n_kv, triton.cdiv(n_keys, keys_per_program))
    launch[grid](query, key, out, n_kv, n_keys, *query.stride(), *key.stride(), *out.stride(),
                 BLOCK=block, TILES=keys_per_program // block, **_pads(groups, dim), **launch_options)
    return out


def row_values(row: torch.Tensor, value: torch.Tensor, launch, block: int, keys_per_program: int,
               **launch_options) -> torch.Tensor:
    """[B, Hkv, G, D] row [B, Hkv, G, K] times value [B, Hkv, K, D]: float32 partials per split of the keys, summed
    (`launch_options`: Triton's num_warps / num_stages)."""
    batch, n_kv, groups, n_keys = row.shape
    dim = value.shape[-1]
    splits = triton.cdiv(n_keys, keys_per_program)
    partial = torch.empty(batch, n_kv, splits, groups, dim, device=value.device, dtype=torch.float32)
    launch[(batch * n_kv, splits)](row, value, partial, n_kv, n_keys, *row.stride(), *value.stride(),
                                   *partial.stride()[:4], BLOCK=block, TILES=keys_per_program // block,
                                   **_pads(groups, dim), **launch_options)
    return partial.sum(dim=2).to(value.dtype)  # [B, Hkv, G, D]
