"""Paper figures, drawn from saved artefacts (an AttentionReport, a SharePlan, a plan search, a heal report).

matplotlib (Agg canvas, no pyplot, so no global figure state and no display needed; seaborn for the clustermap), never torch, never a
model: every figure is a view of an artefact's arrays. Each `plot_*` function returns a `matplotlib.figure.Figure`
(or writes a file and returns its path); `save_figure` writes atomically; `write_heatmap_figures` writes the
standard set that `sa-analyze heatmap` makes. `style` holds what every figure shares; one module per family:
`heatmaps`, `isotropy` (and head alignment), `attention` (single maps), `plan` (plans and searches), `frontier` (cost against savings), `heal`,
`families` (head families: a seaborn clustermap, the one figure drawn through seaborn and pyplot).

Conventions shared by every heatmap:
    rows and columns are layers, cells are square, layer 0 is top left;
    for KL the row is the follower layer m and the column the anchor layer a, the cell is KL(m ‖ a), the information
    follower m would lose by reusing anchor a's attention; infinite cells (masks differ: sliding window vs global)
    are drawn in grey and noted under the colour bar, never hidden or clipped;
    colour limits are robust percentiles of the off-diagonal cells, with colour-bar arrows when cells lie beyond;
    tick labels are thinned at draw time to the largest density that cannot overlap (every k-th layer for L > 16).
"""

from .attention import plot_attention_map, plot_attention_maps
from .families import plot_head_families
from .frontier import plot_frontier
from .heal import plot_heal
from .heatmaps import plot_compare_heatmaps, plot_head_grid, plot_heatmaps, plot_layer_heatmap, write_heatmap_figures
from .isotropy import most_misaligned_pair, plot_compare_isotropy, plot_head_alignment, plot_isotropy_curve
from .plan import heatmap_metric_for, plot_plan_over_heatmap, plot_search
from .style import save_figure

__all__ = [
    "heatmap_metric_for", "plot_frontier", "plot_head_families", "most_misaligned_pair", "plot_attention_map", "plot_attention_maps", "plot_compare_heatmaps",
    "plot_compare_isotropy", "plot_head_alignment", "plot_head_grid", "plot_heal", "plot_heatmaps", "plot_isotropy_curve",
    "plot_layer_heatmap", "plot_plan_over_heatmap", "plot_search", "save_figure", "write_heatmap_figures",
]
