"""Head families drawn as a seaborn clustermap: every (layer, head) row ordered by the hierarchical clustering, with
colour bars for layer depth, head index and family on the margins.

Up to `SUMMARY_ROWS` rows every head is drawn. A larger model (1,024 rows and more) is clustered on all of its rows
all the same, but drawn as a summary: one row per family (families collapsed), the mean similarity between
families, and colour bars for each family's mean layer depth and size. seaborn draws through pyplot: each figure is
closed once it is saved, so no figure state is left behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .style import PALETTE, paper_style, save_figure

if TYPE_CHECKING:  # pragma: no cover
    from ..planner.families import HeadFamilies

SUMMARY_ROWS = 600  # above this many (layer, head) rows the figure collapses families
CBAR_POS = (0.02, 0.955, 0.09, 0.012)  # the similarity colour bar, in the free top-left corner
DEPTH_POS = (0.02, 0.905, 0.09, 0.012)  # the layer-depth colour bar below it


def plot_head_families(families: "HeadFamilies", path: str | Path, title: str = "") -> Path:
    """The clustermap of every head (or of the families, for a large model), saved as PNG at `path`."""
    import matplotlib.pyplot as plt

    with paper_style():
        grid = _summary(families) if len(families.labels) > SUMMARY_ROWS else _every_head(families)
        grid.figure.suptitle(title or _title(families), y=1.04, fontsize=8)
        try:
            return save_figure(grid.figure, Path(path).with_suffix(""), ("png",))[0]
        finally:
            plt.close(grid.figure)


def _title(families: "HeadFamilies") -> str:
    what = "1 - cosine" if families.metric != "kl" else "symmetrised KL"
    shown = len([r for r in families.table])
    return (f"Head families: {len(families.labels)} (layer, head) rows clustered by average linkage on {what},\n"
            f"cut at a distance of {families.threshold:g}: {shown} families of two or more heads")


def _colours(families: "HeadFamilies"):
    """Row colour bars: layer depth (viridis), head index (a qualitative palette), family (grey for singletons)."""
    from matplotlib import colormaps

    depth = colormaps["viridis"]
    rows = families.rows
    sizes = np.bincount(families.labels)
    family_colour = {f: PALETTE[(f - 1) % len(PALETTE)] if sizes[f] > 1 else "#eeeeee" for f in range(1, len(sizes))}
    return [[depth(l / max(families.n_layers - 1, 1)) for l, _ in rows],
            [PALETTE[h % len(PALETTE)] for _, h in rows],
            [family_colour[f] for f in families.labels]]


def _matrix_style(families: "HeadFamilies") -> dict:
    if families.metric == "kl":
        finite = families.similarity[np.isfinite(families.similarity)]
        return dict(cmap="rocket", vmin=0.0, vmax=float(np.percentile(finite, 95)) if finite.size else 1.0,
                    cbar_pos=CBAR_POS, cbar_kws={"label": "symmetrised KL (nats)", "orientation": "horizontal"})
    return dict(cmap="mako", vmin=0.0, vmax=1.0, cbar_pos=CBAR_POS,
                cbar_kws={"label": "cosine similarity", "orientation": "horizontal"})


def _every_head(families: "HeadFamilies"):
    import pandas as pd
    import seaborn as sns

    labels = [f"L{l}H{h}" for l, h in families.rows]
    frame = pd.DataFrame(np.nan_to_num(families.similarity, posinf=np.nan), index=labels, columns=labels)
    colours = _colours(families)
    size = 7.0
    grid = sns.clustermap(frame, row_linkage=families.linkage, col_linkage=families.linkage,
                          row_colors=pd.DataFrame({"layer": colours[0], "head": colours[1], "family": colours[2]}, index=labels),
                          xticklabels=False, yticklabels=len(labels) <= 80, figsize=(size, size),
                          dendrogram_ratio=0.12, colors_ratio=0.025, **_matrix_style(families))
    grid.ax_heatmap.set_xlabel(f"{len(labels)} (layer, head) rows, in cluster order")
    _depth_legend(grid, families)
    return grid


def _summary(families: "HeadFamilies"):
    """Families collapsed: [F, F] mean similarity between families, with mean depth and size as colour bars."""
    import pandas as pd
    import seaborn as sns
    from matplotlib import colormaps
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    ids = np.arange(1, families.n_families + 1)
    members = [np.flatnonzero(families.labels == f) for f in ids]
    mean = np.array([[np.nanmean(families.similarity[np.ix_(a, b)]) for b in members] for a in members])  # [F, F]
    distance = np.array([[np.mean(families.distance[np.ix_(a, b)]) for b in members] for a in members])
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform((distance + distance.T) / 2, checks=False), method="average")
    rows = families.rows
    depth = [np.mean([rows[i][0] for i in m]) / max(families.n_layers - 1, 1) for m in members]
    size = np.array([len(m) for m in members], dtype=float)
    labels = [f"F{f} ({len(m)})" for f, m in zip(ids, members)]
    colours = pd.DataFrame({"mean layer": [colormaps["viridis"](d) for d in depth],
                            "size": [colormaps["Greys"](0.2 + 0.8 * s / size.max()) for s in size]}, index=labels)
    grid = sns.clustermap(pd.DataFrame(mean, index=labels, columns=labels), row_linkage=tree, col_linkage=tree,
                          row_colors=colours, xticklabels=False, yticklabels=len(labels) <= 60, figsize=(7.0, 7.0),
                          dendrogram_ratio=0.12, colors_ratio=0.025, **_matrix_style(families))
    grid.ax_heatmap.set_xlabel(f"{len(labels)} families of {len(families.labels)} heads (mean similarity between them)")
    _depth_legend(grid, families)
    return grid


def _depth_legend(grid, families: "HeadFamilies") -> None:
    """A small colour bar for layer depth beside the row colours."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, families.n_layers - 1), cmap=colormaps["viridis"])
    axis = grid.figure.add_axes(DEPTH_POS)
    bar = grid.figure.colorbar(mappable, cax=axis, orientation="horizontal")
    bar.set_label("layer", fontsize=6)
    bar.ax.tick_params(labelsize=6)
    grid.ax_cbar.tick_params(labelsize=6)
    grid.ax_cbar.xaxis.label.set_size(6)
