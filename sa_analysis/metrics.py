"""Metrics: pairwise attention statistics for every (layer, head) x (layer, head), accumulated block by block.

Every metric of docs/DESIGN.md section 3 is a Gram-type sum over query rows, so it is fed blocks of rows of the
log-probabilities of *all* layers and heads of one sequence, `[L, H, b, K]`, and never needs the whole
`L x H x n x n` tensor. The maps path (`capture.AttentionMaps`) slices blocks out of materialised maps; the
streaming engine recomputes them from stored queries and keys. Both feed the same accumulator, so they give the
same numbers.

With X = P flattened per (l, h), Xr = P with each row normalised, Y = log P (0 where masked):

    cosine (flat)  G  = X X^T,     cos_flat = G / sqrt(diag G diag G^T)
    cosine (row)   Gr = Xr Xr^T,   cos_row = Gr / n_rows
    KL             C  = X Y^T,     KL(a || b) = (N[a] - C[a, b]) / n_rows,   N[a] = sum P_a log P_a
    support        Z  = 1[masked], KL(a || b) = inf where X Z^T > 0 (a attends where b cannot)
    entropy        -N / n_rows
    JS (adjacent layers, same head) is summed directly.

Sums run in float32 (float64 when the input is float64); `operand_dtype=torch.bfloat16` makes the matmul operands
bf16 with fp32 accumulation, the GPU streaming engine's fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG2 = math.log(2.0)


@dataclass
class SequenceStats:
    """The statistics of one sequence (torch tensors on the accumulator's device)."""

    cosine_flat: torch.Tensor  # [L, H, L, H]
    cosine_row: torch.Tensor  # [L, H, L, H]
    kl: torch.Tensor  # [L, H, L, H]  kl[l, h, m, g] = KL(P[l,h] || P[m,g]), inf where support differs
    entropy: torch.Tensor  # [L, H]
    js_adjacent: torch.Tensor  # [L-1, H]
    n_rows: int
    # a sampled run (streaming.sampling): standard error of each field above, and of the head-mean layer matrices
    # `{name}_layers` [L, L]; `sampling` says which rows (RowSample.describe()). None when every row was used.
    se: dict[str, torch.Tensor] | None = None
    sampling: dict | None = None


class PairStatistics:
    """Accumulates Gram-type sums over blocks of query rows of one sequence, for all (layer, head) pairs."""

    def __init__(self, n_layers: int, n_heads: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, operand_dtype: torch.dtype | None = None,
                 track_support: bool = True):
        n = n_layers * n_heads
        self.n_layers, self.n_heads = n_layers, n_heads
        self.dtype = dtype
        self.operand_dtype = operand_dtype or dtype
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.gram_flat = zeros(n, n)
        self.gram_row = zeros(n, n)
        self.cross_log = zeros(n, n)
        self.support_miss = zeros(n, n) if track_support else None
        self.neg_entropy = zeros(n)
        self.js_sum = zeros(max(n_layers - 1, 0), n_heads)
        self.n_rows = 0

    def add(self, log_probs: torch.Tensor) -> None:
        """Add a block of query rows: `log_probs` [L, H, b, K], -inf where masked (fully masked rows are skipped)."""
        n_layers, n_heads, _, _ = log_probs.shape
        n = n_layers * n_heads
        valid = torch.isfinite(log_probs).any(dim=-1).all(dim=(0, 1))  # [b] rows some key is visible in everywhere
        if not bool(valid.all()):
            log_probs = log_probs[:, :, valid]
        if log_probs.shape[2] == 0:
            return
        visible = torch.isfinite(log_probs)  # [L, H, b, K]
        probs = torch.exp(log_probs).to(self.dtype)  # [L, H, b, K], 0 where masked
        log_finite = torch.where(visible, log_probs, 0.0).to(self.dtype)
        row_norm = probs.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(self.dtype).tiny)
        x = probs.reshape(n, -1)  # [N, b*K]
        y = log_finite.reshape(n, -1)
        x_row = (probs / row_norm).reshape(n, -1)
        self.gram_flat += self._gram(x, x)
        self.gram_row += self._gram(x_row, x_row)
        self.cross_log += self._gram(x, y)
        self.neg_entropy += (x * y).sum(dim=1)
        if self.support_miss is not None:
            self.support_miss += self._gram(x, (~visible).reshape(n, -1).to(self.dtype))
        if n_layers > 1:
            self.js_sum += js_divergence(log_probs[:-1], log_probs[1:]).sum(dim=-1).to(self.dtype)
        self.n_rows += log_probs.shape[2]

    def _gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b^T with operands in `operand_dtype` and the result in the accumulator dtype."""
        if self.operand_dtype == self.dtype:
            return a @ b.T
        return (a.to(self.operand_dtype) @ b.to(self.operand_dtype).T).to(self.dtype)

    def result(self) -> SequenceStats:
        """Normalise the sums into the metrics of this sequence."""
        shape = (self.n_layers, self.n_heads, self.n_layers, self.n_heads)
        rows = max(self.n_rows, 1)
        diag = self.gram_flat.diagonal().clamp_min(torch.finfo(self.dtype).tiny)
        cos_flat = self.gram_flat / torch.sqrt(diag[:, None] * diag[None, :])
        kl = (self.neg_entropy[:, None] - self.cross_log) / rows
        if self.support_miss is not None:
            kl = torch.where(self.support_miss > 0, torch.full_like(kl, float("inf")), kl)
        return SequenceStats(
            cosine_flat=cos_flat.reshape(shape),
            cosine_row=(self.gram_row / rows).reshape(shape),
            kl=kl.clamp_min(0.0).reshape(shape),
            entropy=(-self.neg_entropy / rows).reshape(self.n_layers, self.n_heads),
            js_adjacent=self.js_sum / rows,
            n_rows=self.n_rows,
        )


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row, summed over the last axis: [..., K] -> [...]; bounded by log 2."""
    log_m = torch.logaddexp(log_p, log_q) - LOG2
    return 0.5 * (_kl_terms(log_p, log_m) + _kl_terms(log_q, log_m))


def _kl_terms(log_p: torch.Tensor, log_m: torch.Tensor) -> torch.Tensor:
    p = torch.exp(log_p)
    terms = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p))
    return terms.sum(dim=-1)


def drop_first_keys(log_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Leave the first `k` key positions out (attention sinks) and renormalise each row over the rest.

    Rows that saw only those keys become fully masked (-inf) and are skipped by the accumulator.
    """
    if k <= 0:
        return log_probs
    rest = log_probs[..., k:]
    total = torch.logsumexp(rest, dim=-1, keepdim=True)
    out = rest - total
    return torch.where(torch.isfinite(total), out, torch.full_like(out, float("-inf")))


def row_blocks(n_rows: int, block: int):
    """(start, stop) of consecutive blocks of query rows."""
    for start in range(0, n_rows, block):
        yield start, min(n_rows, start + block)


def sequence_stats_from_maps(log_probs: torch.Tensor, exclude_first: int = 0, block: int = 128,
                             operand_dtype: torch.dtype | None = None) -> SequenceStats:
    """Statistics of one sequence from its materialised maps `log_probs` [L, H, n, n] (maps path).

    Blocks of rows only need keys up to the block's last row: later keys are masked by causality.
    """
    n_layers, n_heads, n_rows, _ = log_probs.shape
    dtype = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    visible = torch.isfinite(log_probs)
    masks_differ = not bool((visible == visible[:1, :1]).all())  # e.g. sliding-window next to global layers
    stats = PairStatistics(n_layers, n_heads, log_probs.device, dtype, operand_dtype, track_support=masks_differ)
    for start, stop in row_blocks(n_rows, block):
        stats.add(drop_first_keys(log_probs[:, :, start:stop, :stop], exclude_first))
    return stats.result()
