"""The per-pair cost a follower pays for reusing an anchor: from a report's matrices, optionally with measured
sensitivity."""

from __future__ import annotations

import math
from typing import Any, Mapping, Union

import numpy as np

from ..errors import UserError
from ..report import AttentionReport


COSTS = ("kl", "cosine", "cosine_row", "js")


Budget = Union[int, float, None]


Sensitivity = Union[Mapping[Any, float], np.ndarray, None]


def cost_matrix(report: AttentionReport, cost: str = "kl", sequences: np.ndarray | None = None) -> np.ndarray:
    """[L, L] cost `C[m, a]` of follower `m` reusing anchor `a` (only `a < m` is used); `inf` means forbidden.

    `sequences` (indices, repeats allowed) averages over those analysed sequences instead of all of them: a
    bootstrap resample (`stability`).

    - `kl`: KL(m || a), head mean, in nats (what the follower's attention loses by taking the anchor's).
    - `cosine` / `cosine_row`: 1 - flat / row-mean cosine similarity, head mean.
    - `js`: the report only holds Jensen-Shannon divergence between adjacent layers, so only `C[m, m-1]` is
      finite; plans with this cost must use spans of length 1 (`plan_spans` enforces `max_span=1`).
    NaN (not measured) is treated as forbidden, like `inf`.
    """
    n = report.n_layers
    pick = (lambda arr: arr) if sequences is None else (lambda arr: arr[sequences])

    def layers(name: str) -> np.ndarray:  # [L, L] mean over the chosen sequences
        return np.asarray(pick(report.array(f"{name}_layers")), dtype=float).mean(axis=0)

    if cost == "kl":
        mat = layers("kl")
    elif cost == "cosine":
        mat = 1.0 - layers("cosine_flat")
    elif cost == "cosine_row":
        mat = 1.0 - layers("cosine_row")
    elif cost == "js":
        adjacent = np.asarray(pick(report.array("js_adjacent")), dtype=float).mean(axis=(0, 2))  # [L-1]
        mat = np.full((n, n), np.inf)
        mat[np.arange(1, n), np.arange(n - 1)] = adjacent
    else:
        raise UserError(f"Unknown cost {cost!r}; choose one of {', '.join(COSTS)}.")
    if mat.shape != (n, n):
        raise UserError(f"The report's {cost} matrix has shape {mat.shape}, expected ({n}, {n}); re-run `sa-analyze heatmap`.")
    return np.where(np.isnan(mat), np.inf, mat)


def apply_sensitivity(costs: np.ndarray, sensitivity: Sensitivity, weight: float = 1.0, mode: str = "add") -> np.ndarray:
    """Combine a cost matrix with measured sensitivity (e.g. quality loss found by validation).

    `sensitivity` can be
      - a dict `{follower: loss}` (applies whatever the anchor) and/or `{(follower, anchor): loss}`,
      - an array `[L]` (per follower) or `[L, L]` (per (follower, anchor)); NaN means "not measured".
    `mode="add"` returns `cost + weight * sensitivity` (unmeasured entries add 0): similarity stays the prior and
    measurements correct it. `mode="replace"` returns `weight * sensitivity` where measured and the cost elsewhere.
    A pair-specific entry wins over a per-follower one. `inf` sensitivity forbids the pair.
    """
    if sensitivity is None:
        return costs
    if mode not in ("add", "replace"):
        raise UserError(f"Unknown sensitivity mode {mode!r}; choose 'add' or 'replace'.")
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"The sensitivity weight must be a finite number >= 0; got {weight}.")
    sens = _sensitivity_matrix(sensitivity, costs.shape[0])
    if weight == 0:  # 0 * inf would be NaN: a zero weight ignores the measurement entirely
        return costs
    measured = ~np.isnan(sens)
    if mode == "add":
        return costs + weight * np.where(measured, sens, 0.0)
    return np.where(measured, weight * np.where(measured, sens, 0.0), costs)


def _sensitivity_matrix(sensitivity: Mapping[Any, float] | np.ndarray, n: int) -> np.ndarray:
    """[L, L] sensitivity with NaN where nothing was measured."""
    out = np.full((n, n), np.nan)
    if isinstance(sensitivity, Mapping):
        pairs = [(k, v) for k, v in sensitivity.items() if not isinstance(k, (int, np.integer))]
        singles = [(k, v) for k, v in sensitivity.items() if isinstance(k, (int, np.integer))]
        for m, value in singles:
            _check_layer(int(m), n, "sensitivity follower")
            out[int(m), :] = float(value)
        for key, value in pairs:
            if not (isinstance(key, (tuple, list)) and len(key) == 2):
                raise UserError(f"Sensitivity keys must be a follower layer or a (follower, anchor) pair; got {key!r}.")
            m, a = int(key[0]), int(key[1])
            _check_layer(m, n, "sensitivity follower")
            _check_layer(a, n, "sensitivity anchor")
            out[m, a] = float(value)
        return out
    arr = np.asarray(sensitivity, dtype=float)
    if arr.shape == (n,):
        return np.repeat(arr[:, None], n, axis=1)
    if arr.shape == (n, n):
        return arr.copy()
    raise UserError(f"A sensitivity array must have shape ({n},) or ({n}, {n}); got {arr.shape}.")


def _check_layer(layer: int, n: int, what: str) -> None:
    if not 0 <= layer < n:
        raise UserError(f"The {what} {layer} is outside 0..{n - 1}; use layer indices of this model.")


