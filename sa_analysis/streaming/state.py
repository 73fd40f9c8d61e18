"""What the engine keeps per layer group while it streams: accumulators, row statistics, the operand buffer.

Its own module so that the engine and its backends (`torch_backend`, `kernels`) share it without importing each other.
"""

from __future__ import annotations

import torch

from .store import LayerGroup


class GroupState:
    """Per layer group: its device, accumulator rows, row statistics, and the operand buffer on its device.

    Accumulators have a leading part axis (1 for a run over all rows; the fixed rows and each replicate of a sampled
    run)."""

    def __init__(self, group: LayerGroup, n_total_rows: int, n_layers: int, n_heads: int, acc_dtype, support: bool,
                 parts: int = 1):
        self.group = group
        dev = group.device
        rows = group.n_layers * n_heads
        self.rows = slice(group.start * n_heads, group.stop * n_heads)
        z = lambda *s: torch.zeros(parts, *s, dtype=acc_dtype, device=dev)  # noqa: E731
        self.acc_xy = z(rows, 2 * n_total_rows)  # [R, rows, 2N]
        self.acc_r = z(rows, n_total_rows)  # [R, rows, N]
        self.acc_s = z(rows, n_total_rows) if support else None
        self.neg_entropy = z(n_layers * n_heads)  # [R, N]
        self.js = z(max(n_layers - 1, 0) * n_heads)  # [R, (L-1) H]
        self.buffer: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.lse2: torch.Tensor | None = None
