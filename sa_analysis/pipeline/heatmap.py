"""The heatmap job end to end: load -> tokens -> the attention report (`analysis.analyse`) -> figures; it wires."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from .. import defaults
from ..analysis import analyse
from ..errors import UserError
from ..io import default_out_dir, ensure_writable_dir
from ..loading import LoadedModel
from ..prechecks import check_before_loading, parse_rows
from ..shapes import analysis_length
from ..report import AttentionReport, check_report_model
from .inputs import Bar, CaptureSpec, ModelSpec, Say, Status, TextSpec

def run_heatmap(source: ModelSpec, text: TextSpec = TextSpec(seq_len=None), capture: CaptureSpec = CaptureSpec(), *,
                out: Path, progress: Bar | None = None, status: Status | None = None,
                notice: Say | None = None) -> tuple[AttentionReport, list[Path]]:
    """Load the model, measure the calibration text, save `report.json/.npz` and the figures under `out`; returns
    (report, paths). `progress(total)` may return a context manager yielding `advance(i)` (a bar over sequences);
    `status(message)` a context manager shown while the model loads; `notice(message)` hears a choice the user should
    know of before the work (sampled rows, see `analyse`)."""
    check_before_loading(source.model, out=out, text=text.text, seq_len=text.seq_len)
    _loaded, report, paths = measure_heatmap(source, text, capture, out=out, progress=progress, status=status,
                                             notice=notice)
    return report, paths


def measure_heatmap(source: ModelSpec, text: TextSpec, capture: CaptureSpec = CaptureSpec(), *, out: Path,
                    progress: Bar | None = None, status: Status | None = None, notice: Say | None = None,
                    ) -> tuple[LoadedModel, AttentionReport, list[Path]]:
    """`run_heatmap` less its checks (the job that calls it has made them), returning the loaded model too (a plan
    measured on it next need not load it again).

    `text.seq_len` None: `defaults.SEQ_LEN`, or twice the sliding window of a model that mixes windowed and global
    layers (`shapes.analysis_length`; the report's settings say why, under "length_note").
    """
    rows = parse_rows(capture.rows, text.seq_len, capture.path)
    loaded = source.load(status)
    loaded.without_sharing()  # a healed folder: measure each layer's own attention
    info = loaded.info
    seq_len, length_note = analysis_length(text.seq_len, info.layer_types, info.sliding_window, info.max_positions,
                                           "cuda" in info.device, defaults.SEQ_LEN)
    batch = replace(text, seq_len=seq_len).batch(loaded, "calibration")
    bar = progress(batch.n_seqs) if progress else nullcontext(None)
    with bar as advance:
        report = analyse(loaded, batch, exclude_first=capture.exclude_first, path=capture.path, rows=rows,
                         on_sequence=advance, notice=notice)
    if length_note:
        report.meta["settings"]["length_note"] = length_note
    return loaded, report, write_outputs(report, out, capture.formats)


def report_or_measure(report: str | Path | None, source: ModelSpec | None, text: TextSpec, capture: CaptureSpec,
                      out: Path | None, progress: Bar | None = None, status: Status | None = None,
                      notice: Say | None = None) -> tuple[AttentionReport, Path, ModelSpec, LoadedModel | None]:
    """(report, output folder, the model to measure plans on, loaded model or None): load `report` (checking the
    model against it; that model is the report's own unless `source` names one) or measure `source` now (what the
    jobs that start from a report do: plan, heads, frontier; each has checked its inputs before, `check_report_inputs`
    for plan and heads)."""
    if report is not None:
        att = AttentionReport.load(report)
        named = None if source is None else source.model
        check_report_model(att, named)
        spec = named or att.meta.get("model", {}).get("spec") or att.model_name
        placed = replace(source, model=spec) if source is not None else ModelSpec(spec)
        return att, ensure_writable_dir(default_out_dir(out, att.model_name)), placed, None
    if source is None:
        raise UserError("Give a model to measure or a saved report.")
    out_dir = ensure_writable_dir(default_out_dir(out, source.model))
    loaded, att, _paths = measure_heatmap(source, text, capture, out=out_dir, progress=progress, status=status,
                                          notice=notice)
    return att, out_dir, source, loaded


def check_report_inputs(report: str | Path | None, source: ModelSpec | None, text: TextSpec) -> None:
    """What a job starting from a report or a fresh capture can check before loading: without a report, the model's
    text and --seq-len (the report's own are checked when it is read)."""
    if report is None and source is not None:
        check_before_loading(source.model, text=text.text, seq_len=text.seq_len)


def redraw_heatmap(report: str | Path, out: Path | None = None, formats: Iterable[str] = ("png",),
                   model: str | None = None) -> tuple[AttentionReport, list[Path]]:
    """Redraw the figures of a saved report (no model), beside it or under `out`; returns (report, paths). A `model`
    given with it must be the report's."""
    loaded = AttentionReport.load(report)
    check_report_model(loaded, model)
    return loaded, write_outputs(loaded, out if out is not None else Path(report).parent, formats)


def write_outputs(report: AttentionReport, out: Path, formats: Iterable[str] = ("png",)) -> list[Path]:
    """Save the report and draw its figures under `out`; returns every path written."""
    from ..plots import write_heatmap_figures

    out = ensure_writable_dir(out)
    written = list(report.save(out / "report"))
    written += write_heatmap_figures(report, out, formats=tuple(formats))
    return written
