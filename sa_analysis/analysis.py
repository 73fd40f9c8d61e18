"""The attention report, built: every sequence of a token batch measured (materialised maps for short contexts, the
streaming engine for long ones, sampled rows with standard errors when all rows would take too long), the statistics
gathered into an `AttentionReport` with their spreads and standard errors. Beside `capture` (what one forward
records) and `report` (the record and its views); the heatmap job only wires loading, this and the figures.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Callable

import numpy as np
import torch

from . import defaults
from .artefact import provenance
from .capture import AttentionMaps, capture_attention, measure_block_influence
from .choices import parse_rows
from .data import TokenBatch
from .errors import UserError
from .loading import LoadedModel
from .metrics import SequenceStats, sequence_stats_from_maps
from .report import AttentionReport

MAPS_LIMIT_BYTES = 2 * 1024**3  # beyond this the maps of one sequence would be too large: stream instead
PATHS = ("auto", "maps", "stream")


def choose_path(loaded: LoadedModel, seq_len: int, path: str = "auto", rows: str | int = "auto") -> str:
    """'maps' for short contexts (materialised maps), 'stream' when the maps of one sequence would be large or when
    a number of sampled rows is asked for (only the streaming engine samples)."""
    if path not in PATHS:
        raise UserError(f"Unknown capture path {path!r}; use one of {', '.join(PATHS)}.")
    if isinstance(rows, int):  # only the streaming engine samples (`prechecks.parse_rows` refuses --path maps)
        return "stream"
    if path != "auto":
        return path
    info = loaded.info
    maps_bytes = info.n_layers * info.n_heads * seq_len * seq_len * 4
    return "maps" if maps_bytes <= MAPS_LIMIT_BYTES else "stream"


def preflight(loaded: LoadedModel, batch: TokenBatch, path: str = "auto", rows: str | int = "auto",
              exclude_first: int = 0) -> tuple[str, int | None, str | None]:
    """(capture path, sampled rows per sequence or None for all rows, a note saying why it samples) for this run;
    a streaming run that cannot fit in memory says so before any work."""
    rows = parse_rows(rows, batch.seq_len - exclude_first, path)
    path = choose_path(loaded, batch.seq_len, path, rows)
    sample_rows, note = None, None
    if path == "stream":
        from .streaming import check_fits

        device = str(next(loaded.model.parameters()).device)
        sample_rows, all_rows_seconds = choose_rows(loaded, batch.seq_len, rows, exclude_first)
        sample = _draw(batch.seq_len, sample_rows, exclude_first, seed=0)  # the first sequence's rows
        if all_rows_seconds is not None:
            note = _sampling_note(batch.seq_len - exclude_first, all_rows_seconds, device, sample.rows)
        check_fits(loaded.info, batch.seq_len, device, sample=sample)
    return path, sample_rows, note


def choose_rows(loaded: LoadedModel, seq_len: int, rows: str | int, exclude_first: int
                ) -> tuple[int | None, float | None]:
    """(sampled rows per sequence or None for all, the predicted seconds of all rows when that made `auto` sample):
    `rows` "all", a count, or "auto" (all rows unless they are predicted to take over
    `defaults.SAMPLE_ABOVE_SECONDS` per sequence on this device)."""
    if rows == "all" or isinstance(rows, int):  # a count was checked by `prechecks.parse_rows`
        return (None if rows == "all" else rows), None
    from .streaming.cost import predicted_seconds
    from .streaming.sampling import rows_for_seconds

    info, device = loaded.info, str(next(loaded.model.parameters()).device)
    exact = predicted_seconds(info.n_layers, info.n_heads, seq_len, exclude_first, device)
    if exact <= defaults.SAMPLE_ABOVE_SECONDS:
        return None, None
    count = rows_for_seconds(exact, defaults.SAMPLE_TARGET_SECONDS, seq_len, exclude_first, defaults.REPLICATES)
    if 2 * count > seq_len - exclude_first:
        return None, None
    return count, exact


def _sampling_note(span: int, all_rows_seconds: float, device: str, kept: int) -> str:
    """What the user reads when `--rows auto` samples: why, how many rows, and how to insist on all of them."""
    from .streaming.cost import matmul_rate

    rate = matmul_rate(device)
    speed = f"{rate / 1e12:.0f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.0f} GFLOP/s"
    return (f"all {span} query rows would take about {_duration(all_rows_seconds)} per sequence on {device} (matrix "
            f"products measured at {speed}), so every statistic is estimated from {kept} of them (the first stretch "
            f"whole, {defaults.REPLICATES} stratified replicates of the rest) with a standard error per entry; "
            f"--rows all insists on every row.")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def sequence_stats(model, input_ids: torch.Tensor, *, exclude_first: int = 0, path: str = "maps",
                   sample=None) -> tuple[SequenceStats, np.ndarray]:
    """Statistics and Block Influence [L] of one sequence `input_ids` [1, n]; a `RowSample` (streaming path only)
    estimates them from its rows."""
    with torch.no_grad(), measure_block_influence(model) as influence:
        if path == "stream":
            from .streaming import stream_sequence_stats

            stats, _ = stream_sequence_stats(model, input_ids, exclude_first=exclude_first, sample=sample)
        else:
            maps = AttentionMaps()
            with capture_attention(model, maps):
                model(input_ids=input_ids, use_cache=False)
            device = input_ids.device  # with a device map, each layer's maps sit on that layer's GPU
            log_probs = torch.stack([maps.log_probs[l][0].to(device) for l in sorted(maps.log_probs)])  # [L, H, n, n]
            stats = sequence_stats_from_maps(log_probs, exclude_first=exclude_first)
    return stats, influence.values().numpy()


def analyse(
    loaded: LoadedModel,
    batch: TokenBatch,
    *,
    exclude_first: int = 0,
    path: str = "auto",
    rows: str | int = "auto",
    on_sequence: Callable[[int], None] | None = None,
    notice: Callable[[str], None] | None = None,
) -> AttentionReport:
    """Measure every sequence of `batch` and gather the statistics into an AttentionReport.

    `rows`: "all" query rows, a number of sampled rows per sequence (streaming path; each sequence draws its own,
    seeded by its index), or "auto" (sampled only when all rows would take too long; `notice(message)` hears why
    before the work starts, and the report's settings keep it).
    """
    if exclude_first < 0 or exclude_first >= batch.seq_len - 1:
        raise UserError(f"--exclude-first must be between 0 and {batch.seq_len - 2} for sequences of {batch.seq_len} tokens.")
    path, sample_rows, note = preflight(loaded, batch, path, rows, exclude_first)
    if note and notice is not None:
        notice(note)
    device = next(loaded.model.parameters()).device
    started = time.perf_counter()
    per_sequence, influence = [], []
    sampling = None
    for i in range(batch.n_seqs):
        sample = _draw(batch.seq_len, sample_rows, exclude_first, seed=i)
        stats, bi = sequence_stats(loaded.model, batch.input_ids[i : i + 1].to(device), exclude_first=exclude_first,
                                   path=path, sample=sample)
        per_sequence.append(_to_numpy(stats))
        influence.append(bi)
        sampling = stats.sampling
        if on_sequence is not None:
            on_sequence(i)
    elapsed = time.perf_counter() - started
    settings = {"exclude_first_keys": exclude_first, "path": path, "seconds": round(elapsed, 3)}
    if sampling is not None:
        settings["rows"] = {**sampling, "seed": "the sequence's index"}
        if note:
            settings["rows_note"] = note
    return build_report(loaded, batch, per_sequence, np.stack(influence), settings)


def _draw(seq_len: int, rows: int | None, exclude_first: int, seed: int):
    """The RowSample of one sequence (seeded by its index), or None for all rows."""
    if rows is None:
        return None
    from .streaming import RowSample

    return RowSample.draw(seq_len, rows, exclude_first=exclude_first, replicates=defaults.REPLICATES, seed=seed)


STATS_FIELDS = ("cosine_flat", "cosine_row", "kl", "entropy", "js_adjacent")


def _to_numpy(stats: SequenceStats) -> dict[str, np.ndarray]:
    """The statistics of one sequence as float64 arrays; a sampled run adds `se/<name>` for each (and for the head-mean
    layer matrices `se/<metric>_layers`)."""
    out = {name: getattr(stats, name).detach().to("cpu", torch.float64).numpy() for name in STATS_FIELDS}
    for name, se in (stats.se or {}).items():
        out[f"se/{name}"] = se.detach().to("cpu", torch.float64).numpy()
    return out


def build_report(loaded: LoadedModel, batch: TokenBatch, per_sequence: list[dict[str, np.ndarray]],
                 block_influence: np.ndarray, settings: dict) -> AttentionReport:
    """Means, spreads and per-sequence head-mean layer matrices of the per-sequence statistics."""
    arrays: dict[str, np.ndarray] = {}
    for name in ("cosine_flat", "cosine_row", "kl"):
        stacked = np.stack([s[name] for s in per_sequence])  # [S, L, H, L, H]
        with np.errstate(invalid="ignore"):
            arrays[f"{name}_mean"] = stacked.mean(axis=0).astype(np.float32)
            arrays[f"{name}_std"] = stacked.std(axis=0).astype(np.float32)
        matched = np.diagonal(stacked, axis1=2, axis2=4)  # [S, L, L, H]: head h of layer l vs head h of layer m
        arrays[f"{name}_layers"] = matched.mean(axis=-1).astype(np.float32)
    arrays["entropy"] = np.stack([s["entropy"] for s in per_sequence]).astype(np.float32)
    arrays["js_adjacent"] = np.stack([s["js_adjacent"] for s in per_sequence]).astype(np.float32)
    arrays.update(_standard_errors(per_sequence))
    arrays["block_influence"] = block_influence.astype(np.float32)
    meta = {
        "model": loaded.info.to_dict(),
        "data": batch.describe(),
        "settings": settings,
        "versions": {k: v for k, v in provenance().items() if k != "created"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return AttentionReport(meta=meta, arrays=arrays)


def _standard_errors(per_sequence: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The report's standard-error arrays of a sampled run (none otherwise): of each mean over sequences
    (`{metric}_mean_se`, the sequences' sampling errors being independent: sqrt(sum se^2) / S), and per sequence of
    the head-mean layer matrices, entropies and JS (`{metric}_layers_se`, `entropy_se`, `js_adjacent_se`)."""
    if "se/kl" not in per_sequence[0]:
        return {}
    count = len(per_sequence)
    out = {}
    for name in ("cosine_flat", "cosine_row", "kl"):
        squares = np.stack([s[f"se/{name}"] ** 2 for s in per_sequence]).sum(axis=0)
        out[f"{name}_mean_se"] = (np.sqrt(squares) / count).astype(np.float32)
        out[f"{name}_layers_se"] = np.stack([s[f"se/{name}_layers"] for s in per_sequence]).astype(np.float32)
    for name in ("entropy", "js_adjacent"):
        out[f"{name}_se"] = np.stack([s[f"se/{name}"] for s in per_sequence]).astype(np.float32)
    return out
