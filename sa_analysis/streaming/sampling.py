"""Sampled rows: estimate every statistic from a random subset of query rows, with a standard error per entry.

Every metric of the engine is a sum over query rows (the Gram products, the KL cross terms, entropies, JS), so a
random subset of rows estimates it. The subset is *stratified along the sequence*: the rows [exclude_first, n) are
cut into `strata` equal stretches of length `delta = (n - exclude_first) / strata` (real-valued), and each of
`replicates` independent samples draws one row per stretch,

    position = exclude_first + floor((s + u) * delta),   u ~ Uniform[0, 1),   s = 0 .. strata - 1.

Each position of the sequence then has the same expected count, 1 / delta per replicate (a position cut by a stretch
boundary gets its two shares from the two stretches), so early and late rows both count and delta times the sum over
a replicate's rows is unbiased for the sum over all rows. The first stretch is not sampled but analysed whole (its
rows see few keys and weigh most in the flat cosine). The replicates are independent and identically distributed,
which gives the standard errors: the engine keeps one set of sums per part (the fixed rows, each replicate) and the
delete-one-replicate jackknife (`jackknife`) turns them into a standard error for every entry of the result, ratios
(the flat cosine) included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import defaults


@dataclass(frozen=True)
class RowSample:
    """The query rows of one sampled run.

    The first `fixed` rows after `exclude_first` are always analysed (they hold few keys, so their probabilities are
    large and they weigh heavily in the flat cosine: sampling them would make the estimate heavy-tailed); the rest,
    [exclude_first + fixed, n), are sampled: `positions[r]` are replicate r's rows, sorted, one per stretch of
    `delta` rows. Sums are combined as fixed + delta / R * sum over the replicates (`combine`)."""

    n: int
    exclude_first: int
    fixed: int
    positions: np.ndarray  # [replicates, strata] int64
    seed: int

    @property
    def replicates(self) -> int:
        return int(self.positions.shape[0])

    @property
    def strata(self) -> int:
        return int(self.positions.shape[1])

    @property
    def rows(self) -> int:
        return self.fixed + int(self.positions.size)

    @property
    def delta(self) -> float:
        """Rows of the sequence each sampled row stands for, in each replicate."""
        return (self.n - self.exclude_first - self.fixed) / self.strata

    @property
    def parts(self) -> list[int]:
        """Rows of each part in the compact order: the fixed rows, then each replicate's."""
        return [self.fixed] + [self.strata] * self.replicates

    @classmethod
    def draw(cls, n: int, rows: int, *, exclude_first: int = 0, replicates: int = defaults.REPLICATES,
             seed: int = 0) -> "RowSample":
        """About `rows` rows of a sequence of `n` tokens: the first stretch whole, then `replicates` stratified
        samples of `rows // replicates` rows each of the rest."""
        span = n - exclude_first
        if replicates < 2:
            raise ValueError("a sampled run needs at least 2 replicates (the standard errors come from their spread)")
        strata = max(1, rows // replicates)
        fixed = int(math.ceil(span / (strata + 1)))  # the first of strata + 1 equal stretches
        if strata > span - fixed:
            raise ValueError(f"{rows} rows in {replicates} replicates need {strata} rows per replicate, more than the "
                             f"{span} rows of the sequence allow; analyse all rows instead")
        rng = np.random.default_rng(seed)
        start = exclude_first + fixed
        delta = (n - start) / strata
        u = rng.random((replicates, strata))
        positions = start + np.floor((np.arange(strata)[None, :] + u) * delta).astype(np.int64)
        positions = np.minimum(positions, n - 1)
        return cls(n=n, exclude_first=exclude_first, fixed=fixed, positions=positions, seed=seed)

    def flat(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[rows] int64 positions in the engine's compact order: the fixed rows, then replicate after replicate."""
        first = np.arange(self.exclude_first, self.exclude_first + self.fixed, dtype=np.int64)
        return torch.as_tensor(np.concatenate([first, self.positions.reshape(-1)]), device=device)

    def describe(self) -> dict:
        return {"mode": "sampled", "rows": self.rows, "of": self.n - self.exclude_first, "fixed": self.fixed,
                "replicates": self.replicates, "strata": self.strata, "seed": self.seed}

    def combine(self, sums: dict[str, torch.Tensor], leave_out: int | None = None) -> dict[str, torch.Tensor]:
        """Estimated sums over all rows from per-part sums (leading axis: fixed, then the replicates):
        fixed + delta / R' * (sum over the R' replicates used); `leave_out` drops one replicate (jackknife)."""
        used = self.replicates - (leave_out is not None)
        weight = self.delta / used
        out = {}
        for k, v in sums.items():
            sampled = v[1:].sum(0) if leave_out is None else v[1:].sum(0) - v[1 + leave_out]
            out[k] = v[0] + weight * sampled
        return out


def jackknife(sample: RowSample, sums: dict[str, torch.Tensor],
              estimate: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Delete-one-replicate jackknife standard errors of every output of `estimate`.

    `sums` hold per-part sums (fixed rows, then one per replicate, along the first axis); `estimate` maps combined
    sums to named statistics. SE^2 = (R - 1) / R * sum_r (theta_(r) - mean theta_(.))^2, accumulated in float64
    around the full-sample estimate (so that a tiny spread is not lost to cancellation). Entries that are infinite
    in the full estimate (KL where the masks differ, decided exactly) get 0.
    """
    n_rep = sample.replicates
    full = {k: v.double() for k, v in estimate(sample.combine(sums)).items()}
    first = {k: torch.zeros_like(v) for k, v in full.items()}
    second = {k: torch.zeros_like(v) for k, v in full.items()}
    for r in range(n_rep):
        for k, v in estimate(sample.combine(sums, leave_out=r)).items():
            d = torch.nan_to_num(v.double() - full[k], nan=0.0, posinf=0.0, neginf=0.0)
            first[k] += d
            second[k] += d * d
    out = {}
    for k in full:
        mean_d = first[k] / n_rep
        var = (n_rep - 1) / n_rep * (second[k] - n_rep * mean_d * mean_d)
        se = var.clamp_min(0.0).sqrt()
        out[k] = torch.where(torch.isinf(full[k]), torch.zeros_like(se), se)
    return out


def rows_for_seconds(exact_seconds: float, target_seconds: float, n: int, exclude_first: int = 0,
                     replicates: int = defaults.REPLICATES) -> int:
    """How many rows a sampled run may take to last about `target_seconds` when all rows would take `exact_seconds`
    (the cost of a row grows with its keys, and stratified rows have the average number of keys)."""
    span = n - exclude_first
    fraction = min(1.0, target_seconds / max(exact_seconds, 1e-9))
    rows = int(math.floor(span * fraction / replicates)) * replicates
    return max(replicates * 8, rows)
