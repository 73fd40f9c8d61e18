"""Single attention maps (log colour scale, masked cells white), for notebooks."""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..errors import UserError
from .style import NAN_COLOUR, TICK_FONTSIZE, new_figure, panel_axes, root_figure, paper_style



ATTENTION_CMAP = "magma"  # attention weights (probabilities); similarities use viridis, divergences magma_r


def plot_attention_map(probs, title: str | None = None, ax=None, vmin: float = 1e-4) -> Figure:
    """One head's attention matrix `probs` [Q, K] (rows: query positions, columns: key positions), log colour scale.

    `probs` is a numpy array or a tensor, e.g. `AttentionMaps.probs(layer)[0, head]`. Weights below `vmin` are drawn
    at `vmin` (colour-bar arrow); masked keys (weight exactly 0: the future, or outside a sliding window) are white.
    Draws into `ax` when given (its figure is returned, without a colour bar), else into a new figure with one.
    """
    matrix = _as_matrix(probs)
    with paper_style():
        own = ax is None
        if own:
            fig = new_figure(3.3, 2.75)
            ax = fig.add_subplot()
        fig = root_figure(ax)
        image = _draw_attention(ax, matrix, LogNorm(vmin=vmin, vmax=1.0))
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if title:
            ax.set_title(title)
        if own:
            _attention_colorbar(fig, image, ax)
    return fig


def plot_attention_maps(maps: Sequence, titles: Sequence[str] | None = None, ncols: int | None = None,
                        suptitle: str | None = None, vmin: float = 1e-4) -> Figure:
    """A grid of single heads' attention matrices (each [Q, K]) on one log colour scale with one colour bar."""
    matrices = [_as_matrix(m) for m in maps]
    if not matrices:
        raise UserError("plot_attention_maps needs at least one attention matrix.")
    titles = [""] * len(matrices) if titles is None else [str(t) for t in titles]
    if len(titles) != len(matrices):
        raise UserError(f"Got {len(titles)} titles for {len(matrices)} maps; give one title per map.")
    k = len(matrices)
    ncols = min(k, ncols or 4)
    nrows = math.ceil(k / ncols)
    norm = LogNorm(vmin=vmin, vmax=1.0)
    with paper_style():
        panel = {1: 2.6, 2: 2.2, 3: 1.8}.get(ncols, 1.5)
        fig = new_figure(ncols * (panel + 0.2) + 0.9, nrows * (panel + 0.3) + (0.4 if suptitle else 0.1), layout="compressed")
        axes = panel_axes(fig, k, nrows, ncols)
        image = None
        for i, (ax, matrix, title) in enumerate(zip(axes, matrices, titles)):
            image = _draw_attention(ax, matrix, norm)
            if i >= k - ncols:
                ax.set_xlabel("key position")
            if i % ncols == 0:
                ax.set_ylabel("query position")
            if title:
                ax.set_title(title)
        _attention_colorbar(fig, image, axes, aspect=20 * nrows)
        if suptitle:
            fig.suptitle(suptitle)
    return fig


def _as_matrix(probs) -> np.ndarray:
    if hasattr(probs, "detach"):  # a torch tensor, without importing torch here
        probs = probs.detach().float().cpu().numpy()
    matrix = np.asarray(probs, dtype=float)
    if matrix.ndim != 2:
        raise UserError(f"An attention map must be one head's [query, key] matrix; got shape {matrix.shape} "
                        f"(take e.g. maps.probs(layer)[0, head]).")
    return matrix


def _draw_attention(ax, matrix: np.ndarray, norm: LogNorm):
    cmap = matplotlib.colormaps[ATTENTION_CMAP].with_extremes(bad=NAN_COLOUR)
    shown = np.where(matrix > 0, np.maximum(matrix, norm.vmin), np.nan)  # exactly 0: masked key
    image = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", origin="upper", aspect="equal")
    n_q, n_k = matrix.shape
    for axis, n in ((ax.xaxis, n_k), (ax.yaxis, n_q)):
        axis.set_major_locator(ticker.MaxNLocator(nbins=4, integer=True, min_n_ticks=2))
    ax.set_xlim(-0.5, n_k - 0.5)
    ax.set_ylim(n_q - 0.5, -0.5)
    ax.tick_params(labelsize=TICK_FONTSIZE)
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)
    return image


def _attention_colorbar(fig: Figure, image, ax, aspect: float = 25):
    bar = fig.colorbar(image, ax=ax, extend="min", fraction=0.06, pad=0.03, aspect=aspect)
    bar.set_label("attention weight (log scale)")
    bar.ax.tick_params(labelsize=TICK_FONTSIZE, width=0.5, length=2)
    bar.outline.set_linewidth(0.5)
    return bar
