"""Head families: which heads, anywhere in the model, attend alike.

Every (layer, head) is a row; the report's cross-head arrays (`{metric}_mean [L, H, L, H]`) give the similarity of
every pair. Average-linkage hierarchical clustering on the distance (1 - cosine for the cosines; the symmetrised
divergence (KL(a||b) + KL(b||a)) / 2 for KL) joins the rows into a tree, and cutting it at `threshold` gives the
families: groups whose members are, on average, at least that alike. A family spanning several layers is what
head-aligned sharing can exploit; `head_map_agreement` says how often the planner's Hungarian head maps already
pair its members across layers. From a sampled (long-context) report the standard errors are propagated: the
families are re-cut on `draws` perturbed similarity matrices, and each family says how often its members stay
together. Needs numpy and scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..report import AttentionReport
from .heads import head_alignment

METRICS = {"cosine_flat": "cosine", "cosine_row": "cosine", "kl": "kl"}  # report metric -> planner cost (head maps)
DEFAULT_THRESHOLD = {"cosine_flat": 0.3, "cosine_row": 0.3, "kl": 1.0}  # distance at which the tree is cut
DRAWS = 20  # perturbed re-clusterings of a sampled report


@dataclass
class HeadFamilies:
    """The clustering of all (layer, head) rows and the families cut from it."""

    metric: str
    threshold: float
    similarity: np.ndarray  # [N, N] symmetric similarity (cosine) or divergence (kl), N = L * H rows
    distance: np.ndarray  # [N, N] the distance clustered on
    linkage: np.ndarray  # scipy linkage matrix, [N - 1, 4]
    labels: np.ndarray  # [N] family id per row (1-based, families numbered by size, largest first)
    n_layers: int
    n_heads: int
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per family of two or more heads

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    @property
    def n_families(self) -> int:
        return int(self.labels.max())


def check_family_options(metric: str, threshold: float | None) -> None:
    """The checks that need no report or model (the command line answers them before anything loads)."""
    if metric not in METRICS:
        raise UserError(f"Unknown head-family metric {metric!r}; choose cosine_flat, cosine_row or kl.")
    if threshold is not None and not threshold > 0:
        raise UserError(f"--threshold is a distance and must be > 0; got {threshold}.")


def head_similarity(report: AttentionReport, metric: str = "cosine_flat") -> tuple[np.ndarray, np.ndarray]:
    """([N, N] similarity or symmetrised divergence, [N, N] distance) over all (layer, head) rows."""
    check_family_options(metric, None)
    if not report.has(f"{metric}_mean"):
        raise UserError(f"The report has no {metric}_mean array; re-run `sa-analyze heatmap` to measure it.")
    full = np.asarray(report.array(f"{metric}_mean"), dtype=float)  # [L, H, L, H]
    n = full.shape[0] * full.shape[1]
    flat = full.reshape(n, n)
    values = (flat + flat.T) / 2  # KL symmetrised; flat cosine is symmetric already, row cosine nearly so
    return values, distance_of(values, metric)


def distance_of(values: np.ndarray, metric: str) -> np.ndarray:
    """[N, N] distances between rows from symmetrised `values`: the divergence itself (KL, at least 0) or
    1 - similarity. A pair with no finite value (a KL of inf: disjoint supports) lies twice as far as the farthest
    finite pair (1 where none is finite), so it joins a family last; the diagonal is 0."""
    distance = np.clip(values, 0.0, None) if metric == "kl" else np.clip(1.0 - values, 0.0, None)
    finite = np.isfinite(distance)
    distance = np.where(finite, distance, 2 * distance[finite].max() if finite.any() else 1.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def head_families(report: AttentionReport, metric: str = "cosine_flat", threshold: float | None = None,
                  draws: int = DRAWS, seed: int = 0) -> HeadFamilies:
    """Cluster every (layer, head) of the report and cut the tree into families at `threshold` (a distance)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    check_family_options(metric, threshold)
    threshold = DEFAULT_THRESHOLD[metric] if threshold is None else float(threshold)
    similarity, distance = head_similarity(report, metric)
    tree = linkage(squareform(distance, checks=False), method="average")
    labels = _by_size(fcluster(tree, t=threshold, criterion="distance"))
    families = HeadFamilies(metric, threshold, similarity, distance, tree, labels, report.n_layers, report.n_heads)
    families.table = _table(report, families, _stability(report, metric, threshold, draws, seed))
    return families


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber families 1, 2, ... from the largest to the smallest (ties: the one with the earliest row first)."""
    ids, counts = np.unique(labels, return_counts=True)
    first = {i: int(np.argmax(labels == i)) for i in ids}
    order = sorted(ids, key=lambda i: (-counts[list(ids).index(i)], first[i]))
    mapping = {old: new + 1 for new, old in enumerate(order)}
    return np.array([mapping[v] for v in labels])


def _table(report: AttentionReport, families: HeadFamilies, stability: np.ndarray | None) -> list[dict[str, Any]]:
    """One row per family of at least two heads: members, layers, within-family similarity, head-map agreement."""
    rows = families.rows
    out = []
    for family in range(1, families.n_families + 1):
        members = np.flatnonzero(families.labels == family)
        if len(members) < 2:
            continue
        inner = families.similarity[np.ix_(members, members)][~np.eye(len(members), dtype=bool)]
        layers = sorted({rows[i][0] for i in members})
        row = {"family": family, "size": int(len(members)), "members": [list(rows[i]) for i in members],
               "layers": layers, "first_layer": layers[0], "last_layer": layers[-1],
               "within": float(np.mean(inner)), "head_maps_follow": head_map_agreement(report, families, members)}
        if stability is not None:
            together = stability[np.ix_(members, members)][~np.eye(len(members), dtype=bool)]
            row["stays_together"] = float(np.mean(together))
        out.append(row)
    return out


def head_map_agreement(report: AttentionReport, families: HeadFamilies, members: np.ndarray) -> float | None:
    """Share of the family's members in a later layer whose planner head map (Hungarian, to the nearest earlier
    layer the family has a member in) points at a member of the family; None for a family within one layer."""
    cost = METRICS[families.metric]
    alignment = head_alignment(report, cost)
    rows = families.rows
    by_layer: dict[int, set[int]] = {}
    for i in members:
        layer, head = rows[i]
        by_layer.setdefault(layer, set()).add(head)
    layers = sorted(by_layer)
    if len(layers) < 2:
        return None
    hits = total = 0
    for previous, layer in zip(layers, layers[1:]):
        for head in by_layer[layer]:
            total += 1
            hits += int(alignment.maps[layer, previous, head]) in by_layer[previous]
    return hits / total


def _stability(report: AttentionReport, metric: str, threshold: float, draws: int, seed: int) -> np.ndarray | None:
    """[N, N] share of `draws` re-clusterings (similarity drawn within its standard errors) that keep each pair of
    rows in one family; None for a report over all rows (no sampling error)."""
    if not report.has(f"{metric}_mean_se") or draws < 1:
        return None
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    full = np.asarray(report.array(f"{metric}_mean"), dtype=float)
    se = np.asarray(report.array(f"{metric}_mean_se"), dtype=float)
    n = full.shape[0] * full.shape[1]
    rng = np.random.default_rng(seed)
    together = np.zeros((n, n))
    for _ in range(draws):
        noisy = full + rng.standard_normal(full.shape) * np.nan_to_num(se)
        flat = noisy.reshape(n, n)
        distance = distance_of((flat + flat.T) / 2, metric)
        labels = fcluster(linkage(squareform(distance, checks=False), method="average"), t=threshold, criterion="distance")
        together += labels[:, None] == labels[None, :]
    return together / draws
