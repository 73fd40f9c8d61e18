"""Attention masks per layer (sliding window or global), and what sharing does where an anchor's mask differs
from its follower's.

A follower reuses its anchor's softmax, so it attends within the anchor's mask: a global layer following a
sliding anchor becomes windowed past the window's length; a sliding layer following a global anchor attends to
(and caches) every token. An analysis no longer than the window cannot see either: both masks are the same causal
triangle there, so the report calls such layers alike. The planner therefore reads the masks from the model's
configuration, not from the report.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def layer_windows(model: Mapping[str, Any], n_layers: int) -> list[int | None]:
    """[L] the sliding window of each layer (None: global), from the plan's or report's model dict."""
    types = model.get("layer_types") or []
    window = model.get("sliding_window")
    if len(types) != n_layers or not window:
        return [None] * n_layers
    return [int(window) if kind == "sliding_attention" else None for kind in types]


def masks_differ(windows: list[int | None]) -> np.ndarray:
    """[L, L] bool: layer m's mask differs from layer a's (a window against none, or two different windows)."""
    n = len(windows)
    return np.array([[windows[m] != windows[a] for a in range(n)] for m in range(n)], dtype=bool).reshape(n, n)


def describe_window(window: int | None) -> str:
    return "all tokens" if window is None else f"the last {window} tokens"


def mask_note(follower: int, anchor: int, windows: list[int | None]) -> str | None:
    """One sentence on what sharing does to `follower` when its anchor's mask differs from its own, else None."""
    own, theirs = windows[follower], windows[anchor]
    if own == theirs:
        return None
    if theirs is not None and (own is None or theirs < own):
        return (f"layer {follower} attends to {describe_window(own)} but its anchor {anchor} to {describe_window(theirs)}: "
                f"while shared, past {theirs} tokens layer {follower} sees only the last {theirs}")
    return (f"layer {follower} attends to {describe_window(own)} but its anchor {anchor} to {describe_window(theirs)}: "
            f"while shared, layer {follower} attends to (and caches) {describe_window(theirs)}, beyond its own window")


def analysis_note(windows: list[int | None], analysed_len: int | None) -> str | None:
    """A sentence when the analysed sequences were no longer than a window that separates layers' masks."""
    finite = [w for w in windows if w is not None]
    if not finite or len(set(windows)) < 2 or analysed_len is None or analysed_len > max(finite):
        return None
    return (f"the analysis ({analysed_len} tokens) is no longer than the sliding window ({max(finite)}), so windowed and "
            f"global layers look alike in the report; pairs mixing them were judged by their masks, not by the report "
            f"(run `sa-analyze heatmap --seq-len {min(2 * max(finite), 1 << 20)}` to measure them)")
