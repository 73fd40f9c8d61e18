"""What a model spec's configuration says, read before any model loads (no torch): its layer count, context and
query heads.

Mistakes that only need these numbers (a span past the last layer, a --seq-len past the context) are then answered
in a second or two instead of after loading the weights. Aliases carry their config; a folder (or an exported
shared model) has its config.json. Hub ids and GGUF files are left to the load itself (None here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .aliases import find_alias
from .errors import UserError


@dataclass(frozen=True)
class ConfigShape:
    """The numbers of a model's config that wrong inputs are checked against."""

    n_layers: int
    max_positions: int | None
    n_heads: int | None = None

    def check_seq_len(self, seq_len: int) -> None:
        check_seq_len(seq_len, self.max_positions)


def check_seq_len(seq_len: int, max_positions: int | None) -> None:
    """A --seq-len past the model's context (`max_positions`; None or 0: unknown) is a user error."""
    if max_positions and seq_len > max_positions:
        raise UserError(f"--seq-len {seq_len} is longer than this model's context of {max_positions} tokens; "
                        f"use --seq-len {max_positions} or less.")


def peek_shape(spec: str) -> ConfigShape | None:
    """The layer count and context of `spec` from its configuration alone, or None when that needs the model."""
    alias = find_alias(spec)
    if alias is not None:
        return _shape(alias.config)
    config = Path(spec).expanduser() / "config.json"
    if config.is_file():
        try:
            return _shape(json.loads(config.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # the load will say what is wrong with the folder
    return None


def _shape(config: dict) -> ConfigShape | None:
    text = config.get("text_config") or config
    layers = text.get("num_hidden_layers") or text.get("n_layer")
    if not isinstance(layers, int):
        return None
    positions = text.get("max_position_embeddings") or text.get("n_positions")
    heads = text.get("num_attention_heads") or text.get("n_head")
    return ConfigShape(layers, positions if isinstance(positions, int) else None, heads if isinstance(heads, int) else None)


CPU_EXPOSE_LIMIT = 2048  # on a CPU, the default analysis is not lengthened past this many tokens (time)


def analysis_length(requested: int | None, layer_types: list[str], window: int | None, max_positions: int | None,
                    on_gpu: bool, default: int) -> tuple[int, str | None]:
    """(tokens per analysed sequence, a sentence for the user or None).

    Windowed (sliding) and global layers only differ on sequences longer than the window; an analysis shorter
    than it calls them alike. Without a --seq-len the analysis of a model that mixes them is lengthened to twice the
    window (within the context, and on a CPU only up to `CPU_EXPOSE_LIMIT` tokens: otherwise it says why not).
    """
    mixed = bool(window) and len(set(layer_types)) > 1
    if not mixed or (requested is None and default > window):
        return (requested or default), None
    if requested is not None:
        if requested > window:
            return requested, None
        return requested, (f"--seq-len {requested} does not reach the {window}-token sliding window, so windowed and global "
                           f"layers look alike in this analysis; the planner keeps them apart by their masks "
                           f"(--seq-len {2 * window} measures them)")
    wanted = min(2 * window, max_positions or 2 * window)
    if not on_gpu and wanted > CPU_EXPOSE_LIMIT:
        return default, (f"analysing {default} tokens per sequence: exposing the {window}-token sliding window needs "
                         f"--seq-len {wanted}, too slow on a CPU (run it on a GPU); the planner keeps windowed and global "
                         f"layers apart by their masks")
    return wanted, (f"analysing {wanted} tokens per sequence (twice the {window}-token sliding window) so that windowed "
                    f"and global layers are told apart")
