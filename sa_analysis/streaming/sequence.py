"""One sequence end to end: a forward that records queries and keys, then the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..capture import capture_attention
from ..metrics import SequenceStats
from .engine import StreamingStatistics
from .memory import check_fits
from .sampling import RowSample
from .store import QKStore

if TYPE_CHECKING:
    from ..loading import ModelInfo

# ----- the entry point ------------------------------------------------------------------------------------------------
def stream_sequence_stats(model, input_ids: torch.Tensor, *, exclude_first: int = 0, sample: RowSample | None = None,
                          operand_dtype: torch.dtype | None = None, block_rows: int | None = None,
                          memory_fraction: float = 0.8, return_logits: bool = False,
                          backend: str = "auto", check_memory: bool = True, timings: dict | None = None,
                          engine_options: dict | None = None) -> tuple[SequenceStats, torch.Tensor | None]:
    """All pairwise attention statistics of one sequence `input_ids` [1, n] in one forward plus streamed products.

    Returns the same `SequenceStats` as `metrics.sequence_stats_from_maps` on the model's attention maps, and the
    logits when `return_logits` (else None; the forward then computes only the last position's logits).
    Raises `UserError` before any work when the run cannot fit in GPU memory. `engine_options` are passed to
    `StreamingStatistics` (tuning knobs: tile, stats_tile, gram, tri_chunks, unit_elements). With `sample` (a
    `RowSample` drawn for this length) only its query rows are kept and analysed: the statistics are estimates with a
    standard error per entry (`SequenceStats.se`).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, n], got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    store = QKStore.for_model(model, rows=None if sample is None else sample.flat())
    plans = []
    if check_memory:
        from ..loading import describe

        info = describe(model, "model", "model", "loaded")
        for g in store.groups:
            if g.device.type == "cuda":
                share = _share(info, g.n_layers + g.halo)
                plans.append(check_fits(share, n, g.device, operand_dtype=operand_dtype, block_rows=block_rows,
                                        memory_fraction=memory_fraction, sample=sample))
    embed_device = model.get_input_embeddings().weight.device
    ev = _Events(timings, store.groups[0].device)
    ev.mark("start")
    with torch.no_grad(), capture_attention(model, store):
        kwargs: dict[str, Any] = {"use_cache": False}
        if not return_logits:
            kwargs["logits_to_keep"] = 1
        try:
            out = model(input_ids=input_ids.to(embed_device), **kwargs)
        except TypeError:
            kwargs.pop("logits_to_keep", None)
            out = model(input_ids=input_ids.to(embed_device), **kwargs)
    logits = out.logits if return_logits else None
    del out
    store.finish()
    ev.mark("forward")
    unit_elements = min(p.unit_elements for p in plans) if plans else None
    key_chunk = min(p.key_chunk for p in plans) if plans else None
    with torch.no_grad():
        options = dict(block_rows=block_rows, key_chunk=key_chunk, unit_elements=unit_elements)
        options.update(engine_options or {})
        engine = StreamingStatistics(store, exclude_first=exclude_first, sample=sample, operand_dtype=operand_dtype,
                                     backend=backend, **options)
        stats = engine.run()
    ev.mark("metrics")
    store.release()
    ev.finish()
    return stats, logits


def _share(info: ModelInfo, n_layers: int) -> Any:
    """A copy of `info` with only `n_layers` layers (the part of the model on one device)."""
    import copy

    share = copy.copy(info)
    share.n_layers = n_layers
    return share


class _Events:
    """Optional wall-clock marks (CUDA-synchronised) into a dict: forward and metrics seconds."""

    def __init__(self, out: dict | None, device: torch.device):
        self.out, self.device, self.t = out, device, {}

    def mark(self, name: str) -> None:
        if self.out is None:
            return
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t[name] = time.perf_counter()

    def finish(self) -> None:
        if self.out is None:
            return
        self.out["forward_s"] = self.t["forward"] - self.t["start"]
        self.out["metrics_s"] = self.t["metrics"] - self.t["forward"]
