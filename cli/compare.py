"""`sa-analyze compare`: layer similarity of several checkpoints of one model side by side (the SA paper's figure).

Before and after a fine-tune, a quantisation, or along pretraining: every checkpoint is measured on the same token
ids, drawn on one colour scale, and summarised in one table.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from cli.app import (DEFAULT_N_SEQS, DEFAULT_SEQ_LEN, DeviceMapOpt, DeviceOpt, DtypeOpt, NSeqsOpt, SeqLenOpt, TextOpt,
                     app, console, user_errors, wrote)
from sa_analysis.errors import UserError

DEFAULT_OUT = Path("sa-output") / "compare"

ModelsOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", help="A checkpoint to measure (alias, hub id in the local HF cache, folder or .gguf); repeat for each.")]
ReportsOpt = Annotated[Optional[list[Path]], typer.Option(
    "--report", "-r", help="A report.json written by `sa-analyze heatmap`, instead of a model; repeat for each.")]
LabelsOpt = Annotated[Optional[list[str]], typer.Option(
    "--label", "-l", help="A name per input, in the same order (default: the model names); also its folder under --out.")]


@app.command("compare")
@user_errors
def compare(
    model: ModelsOpt = None,
    report: ReportsOpt = None,
    label: LabelsOpt = None,
    metric: Annotated[str, typer.Option("--metric", help="cosine_flat, cosine_row or kl.")] = "cosine_flat",
    span_len: Annotated[int, typer.Option("--span-len", min=2, help="Length of the 'most isotropic span' in the table.")] = 4,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    device_map: DeviceMapOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Output folder. Default: {DEFAULT_OUT}/.")] = None,
    exclude_first: Annotated[int, typer.Option("--exclude-first", min=0, help="Leave the first k key positions (attention sinks) out of every metric.")] = 0,
    pdf: Annotated[bool, typer.Option("--pdf", help="Also write the figures as PDF.")] = False,
) -> None:
    """Compare the layer x layer attention similarity of several checkpoints of one model (before/after a fine-tune,
    a quantisation, pretraining steps): one heatmap per checkpoint on a shared colour scale, their adjacent-layer
    similarity overlaid, and a summary table.

    With --model, each checkpoint is measured on the same text and its report saved under --out/<label>/; with
    --report, saved reports are compared without any model.
    """
    from sa_analysis.io import ensure_writable_dir, write_json
    from sa_analysis.plots import plot_compare_heatmaps, plot_compare_isotropy, save_figure
    from sa_analysis.report import AttentionReport, compare_summary, metric as lookup_metric

    lookup_metric(metric)
    models, reports_in = list(model or []), list(report or [])
    if models and reports_in:
        raise UserError("Give either --model or --report inputs, not both; measure the models first with `sa-analyze heatmap` and compare their reports.")
    inputs = models or [str(p) for p in reports_in]
    if len(inputs) < 2:
        raise UserError("Compare needs two or more inputs: repeat --model (or --report) once per checkpoint.")
    if label and len(label) != len(inputs):
        raise UserError(f"Got {len(label)} --label for {len(inputs)} inputs; give one --label per input, in the same order.")
    formats = ("png", "pdf") if pdf else ("png",)

    if reports_in:
        reports = [AttentionReport.load(p) for p in reports_in]
        labels = list(label) if label else _unique([_report_name(r) for r in reports])
        folders = _folders(labels)
        compare_summary(reports, labels, metric, span_len)  # different depths fail before anything is written
        out_dir = ensure_writable_dir(out if out is not None else DEFAULT_OUT)
        written: list[Path] = []
    else:
        labels = list(label) if label else _unique([Path(m).name or m for m in models])
        folders = _folders(labels)
        out_dir = ensure_writable_dir(out if out is not None else DEFAULT_OUT)
        reports, written = _measure(models, labels, folders, out_dir, formats, device=device, dtype=dtype,
                                    device_map=device_map, text=text, n_seqs=n_seqs, seq_len=seq_len,
                                    exclude_first=exclude_first)

    rows = compare_summary(reports, labels, metric, span_len)
    written += save_figure(plot_compare_heatmaps(reports, labels, metric), out_dir / f"compare_{metric}", formats)
    written += save_figure(plot_compare_isotropy(reports, labels, metric), out_dir / f"compare_adjacent_{metric}", formats)
    inputs_desc = [{"label": l, "input": i, "folder": f if models else None} for l, i, f in zip(labels, inputs, folders)]
    written.append(write_json(out_dir / f"compare_{metric}.json", {"metric": metric, "span_len": span_len, "inputs": inputs_desc,
                                                                  "rows": [_json_row(r) for r in rows]}))
    _print_table(rows, metric, span_len)
    if len({r["token_sha1"] for r in rows}) > 1:
        console.print("Note: these inputs were measured on different token ids (another text, length or tokenizer), so "
                      "their differences mix checkpoint and data.", style="yellow", highlight=False)
    console.print(f"[bold]Comparison[/] of {len(rows)} checkpoints in [cyan]{out_dir}[/]:")
    wrote(written)


def _measure(models, labels, folders, out_dir: Path, formats, **capture) -> tuple[list, list[Path]]:
    """Measure each model on the same token ids into a hidden work folder; move the results under `out_dir` only once
    every model has been measured and their depths match, so a mistake leaves no partial output."""
    from cli.app import loading_status, sequence_progress
    from sa_analysis.pipeline import run_heatmap
    from sa_analysis.report import compare_summary

    work = Path(tempfile.mkdtemp(prefix=".compare-", dir=out_dir))
    try:
        reports, written = [], []
        for spec, label, folder in zip(models, labels, folders):
            console.print(f"[bold]{escape(label)}[/]: {escape(spec)}", highlight=False)
            report, _paths = run_heatmap(spec, out=work / folder, formats=formats, progress=sequence_progress,
                                         status=loading_status, **capture)
            reports.append(report)
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


def _fmt(value: float) -> str:
    return "inf" if np.isposinf(value) else ("n/a" if not np.isfinite(value) else f"{value:.3f}")


def _print_table(rows: list[dict], metric: str, span_len: int) -> None:
    from sa_analysis.report import metric as lookup_metric

    info = lookup_metric(metric)
    short = {"cosine_flat": "cos", "cosine_row": "row cos", "kl": "KL"}[metric]
    best = "highest" if info.similarity else "lowest"
    table = Table(title=escape(f"Layer similarity per checkpoint ({info.label}, head mean)"), title_justify="left")
    adjacent = f"mean {short}(l, l+1)" if info.similarity else "mean KL(l+1 ‖ l)"
    for column in ("checkpoint", "model", "layers", f"mean {short}, all pairs", adjacent,
                   f"most isotropic {span_len} layers"):
        table.add_column(column, justify="left" if column in ("checkpoint", "model") else "right", no_wrap=True)
    for r in rows:
        first, last = r["span"]
        table.add_row(escape(r["label"]), escape(r["model"]), str(r["n_layers"]), _fmt(r["off_diagonal_mean"]), _fmt(r["adjacent_mean"]),
                      f"{first}-{last} ({_fmt(r['span_score'])})")
    console.print(table)
    direction = "what layer l+1 loses by reusing layer l" if not info.similarity else f"{short} of layer l and l+1"
    console.print(f"all pairs: mean over every pair of distinct layers (finite values); (l, l+1): {direction}; most "
                  f"isotropic: the run of {span_len} consecutive layers with the {best} mean pairwise value.", highlight=False)


def _json_row(row: dict) -> dict:
    out = dict(row)
    for key in ("off_diagonal_mean", "adjacent_mean", "span_score"):
        value = out[key]
        out[key] = None if np.isnan(value) else ("inf" if np.isinf(value) else value)
    out["span"] = list(out["span"])
    return out
