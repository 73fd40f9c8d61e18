"""The statistics every measured number carries: means over sequences with Student-t intervals, and what an NLL
change means as a perplexity change. Sequences are independent samples of text, so per-sequence values give honest
intervals (paired where two models read the same sequences). Needs nothing but the standard library and scipy."""

from __future__ import annotations

import math
from typing import Sequence

LEVEL = 0.95  # the intervals' coverage


def mean_and_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-sequence values and its Student-t interval (with one sequence the
    interval is the mean itself)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def interval(name: str, values: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """{name: mean, name_low, name_high} over sequences. A divergence ("kl") stops at 0 (few sequences make the t
    interval wide)."""
    mean, low, high = mean_and_interval(values, level)
    if name == "kl":
        low = max(low, 0.0)
    return {name: mean, f"{name}_low": low, f"{name}_high": high}


def paired_interval(first: Sequence[float], second: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of `first - second` per sequence: two models on the same sequences."""
    if len(first) != len(second):
        raise ValueError(f"paired values need the same sequences: {len(first)} vs {len(second)}")
    return mean_and_interval([a - b for a, b in zip(first, second)], level)


def ppl_change(nll_change: float) -> float:
    """The relative perplexity change a mean NLL change (nats) means: exp(change) - 1."""
    return math.expm1(nll_change)


def percent(nll_change: float) -> float:
    """`ppl_change` in percent."""
    return 100.0 * math.expm1(nll_change)
