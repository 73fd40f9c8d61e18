"""Independent references: eager float64 attention maps and the metrics of DESIGN.md section 3, pair by pair.

Nothing here uses sa_analysis' capture or metrics code: maps come from transformers' own eager attention
(`output_attentions=True`) and the metrics are computed in numpy float64 straight from their definitions.
"""

from __future__ import annotations

import copy

import numpy as np
import torch


def eager_maps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """[L, B, H, Q, K] attention weights from a float64 eager copy of `model`."""
    reference = copy.deepcopy(model).to(torch.float64)
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        out = reference(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, use_cache=False)
    return np.stack([a.detach().cpu().numpy() for a in out.attentions])


def drop_sinks(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows x keys after leaving the first k keys out and renormalising; returns (P', kept rows mask)."""
    rest = p[:, k:]
    total = rest.sum(axis=1, keepdims=True)
    keep = total[:, 0] > 0
    return np.where(total > 0, rest / np.where(total > 0, total, 1), 0.0)[keep], keep


def kl_rows(p: np.ndarray, q: np.ndarray) -> float:
    """mean_i sum_j p log(p/q), inf where q = 0 < p."""
    total = 0.0
    for pi, qi in zip(p, q):
        support = pi > 0
        if np.any(qi[support] == 0):
            return float("inf")
        total += float(np.sum(pi[support] * (np.log(pi[support]) - np.log(qi[support]))))
    return total / len(p)


def reference_metrics(maps: np.ndarray, exclude_first: int = 0) -> dict[str, np.ndarray]:
    """Pairwise metrics of one sequence from its maps [L, H, n, n], by direct loops over every pair."""
    n_layers, n_heads = maps.shape[:2]
    flat = [[None] * n_heads for _ in range(n_layers)]
    for l in range(n_layers):
        for h in range(n_heads):
            flat[l][h], _ = drop_sinks(maps[l, h], exclude_first)
    shape = (n_layers, n_heads, n_layers, n_heads)
    cos_flat, cos_row, kl = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for l in range(n_layers):
        for h in range(n_heads):
            a = flat[l][h]
            for m in range(n_layers):
                for g in range(n_heads):
                    b = flat[m][g]
                    cos_flat[l, h, m, g] = np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))
                    cos_row[l, h, m, g] = np.mean(np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1)))
                    kl[l, h, m, g] = kl_rows(a, b)
    entropy = np.array([[-np.mean(np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1)), 0), 1))
                         for a in row] for row in flat])
    js = np.zeros((n_layers - 1, n_heads))
    for l in range(n_layers - 1):
        for h in range(n_heads):
            a, b = flat[l][h], flat[l + 1][h]
            mid = (a + b) / 2
            js[l, h] = 0.5 * kl_rows(a, mid) + 0.5 * kl_rows(b, mid)
    return {"cosine_flat": cos_flat, "cosine_row": cos_row, "kl": kl, "entropy": entropy, "js_adjacent": js}
