"""The compare job: several checkpoints of one model measured on the same token ids (or their saved reports), drawn
on one colour scale, and summarised (the Shared Attention paper's figure)."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import defaults
from ..errors import UserError
from ..io import ensure_writable_dir, json_safe, write_json
from ..report import AttentionReport, compare_summary, metric as lookup_metric
from .heatmap import run_heatmap
from .inputs import Bar, CaptureSpec, ModelSpec, Say, Status, TextSpec

DEFAULT_OUT = Path(defaults.COMPARE_OUT)


@dataclass
class CompareResult:
    """The compared reports, their labels, the summary rows (one per checkpoint), the folder and the files written."""

    reports: list[AttentionReport]
    labels: list[str]
    rows: list[dict[str, Any]]
    out: Path
    files: list[Path]


def run_compare(models: Sequence[str] = (), reports: Sequence[str | Path] = (), labels: Sequence[str] | None = None, *,
                placement: ModelSpec = ModelSpec(), text: TextSpec = TextSpec(seq_len=None),
                capture: CaptureSpec = CaptureSpec(), metric: str = "cosine_flat", span_len: int = 4,
                out: Path | None = None, on_model: Callable[[str, str], None] | None = None,
                progress: Bar | None = None, status: Status | None = None, notice: Say | None = None) -> CompareResult:
    """Compare two or more checkpoints, given as models to measure (each as `placement` says, on the same `text`,
    captured as `capture` says) or as saved reports; writes compare_<metric>.png, compare_adjacent_<metric>.png and
    compare_<metric>.json under `out` (figures in `capture.formats`). `on_model(label, spec)` is called before each
    model is measured; `progress`, `status`, `notice` as `run_heatmap`."""
    from ..plots import plot_compare_heatmaps, plot_compare_isotropy, save_figure

    lookup_metric(metric)
    models, reports_in = list(models), list(reports)
    if models and reports_in:
        raise UserError("Give either --model or --report inputs, not both; measure the models first with `sa-analyze heatmap` and compare their reports.")
    inputs = models or [str(p) for p in reports_in]
    if len(inputs) < 2:
        raise UserError("Compare needs two or more inputs: repeat --model (or --report) once per checkpoint.")
    if labels and len(labels) != len(inputs):
        raise UserError(f"Got {len(labels)} --label for {len(inputs)} inputs; give one --label per input, in the same order.")
    if reports_in:
        loaded = [AttentionReport.load(p) for p in reports_in]
        labels = list(labels) if labels else _unique([_report_name(r) for r in loaded])
        folders = _folders(labels)
        compare_summary(loaded, labels, metric, span_len)  # different depths fail before anything is written
        out_dir = ensure_writable_dir(out if out is not None else DEFAULT_OUT)
        written: list[Path] = []
    else:
        labels = list(labels) if labels else _unique([Path(m).name or m for m in models])
        folders = _folders(labels)
        out_dir = ensure_writable_dir(out if out is not None else DEFAULT_OUT)
        sources = [replace(placement, model=m) for m in models]
        loaded, written = _measure(sources, labels, folders, out_dir, on_model,
                                   lambda source, folder: run_heatmap(source, text, capture, out=folder, progress=progress,
                                                                      status=status, notice=notice)[0])
    rows = compare_summary(loaded, labels, metric, span_len)
    formats = capture.formats
    written += save_figure(plot_compare_heatmaps(loaded, labels, metric), out_dir / f"compare_{metric}", formats)
    written += save_figure(plot_compare_isotropy(loaded, labels, metric), out_dir / f"compare_adjacent_{metric}", formats)
    described = [{"label": l, "input": i, "folder": f if models else None} for l, i, f in zip(labels, inputs, folders)]
    written.append(write_json(out_dir / f"compare_{metric}.json",
                              {"metric": metric, "span_len": span_len, "inputs": described,
                               "rows": [json_safe({**r, "span": list(r["span"])}) for r in rows]}))
    return CompareResult(loaded, labels, rows, out_dir, written)


def _measure(sources, labels, folders, out_dir: Path, on_model, measure) -> tuple[list, list[Path]]:
    """Measure each model on the same token ids into a hidden work folder; move the results under `out_dir` only once
    every model has been measured and their depths match, so a mistake leaves no partial output."""
    out_dir.mkdir(parents=True, exist_ok=True)  # the first thing written here: the work folder
    work = Path(tempfile.mkdtemp(prefix=".compare-", dir=out_dir))
    try:
        reports, written = [], []
        for source, label, folder in zip(sources, labels, folders):
            if on_model:
                on_model(label, source.model)
            reports.append(measure(source, work / folder))
            compare_summary(reports, labels[: len(reports)])  # stop at the first checkpoint of another depth
        for folder in folders:
            target = out_dir / folder
            if target.exists():
                shutil.rmtree(target)
            (work / folder).rename(target)
            written += sorted(p for p in target.iterdir() if p.is_file())
        return reports, written
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _report_name(report) -> str:
    """A report's default label: its model's name, marked when its weights were random."""
    random = (report.meta.get("model") or {}).get("source") == "random-init"
    return f"{report.model_name} (random init)" if random else report.model_name


def _unique(names: list[str]) -> list[str]:
    """Default labels, numbered where two inputs share a name."""
    return [f"{n}-{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _folders(labels: list[str]) -> list[str]:
    """Path-safe folder names of the labels, checked distinct."""
    if len(set(labels)) != len(labels):
        raise UserError(f"The labels {', '.join(labels)} repeat; give each input its own --label.")
    folders = ["".join(c if c.isalnum() or c in "-_." else "_" for c in l).strip(".") or "input" for l in labels]
    if len(set(folders)) != len(folders):
        raise UserError(f"The labels {', '.join(labels)} give the same folder name; choose labels that differ in letters or digits.")
    return folders
