"""`sa-analyze compare`: layer similarity of several checkpoints of one model side by side (the SA paper's figure).

Before and after a fine-tune, a quantisation, or along pretraining: every checkpoint is measured on the same token
ids, drawn on one colour scale, and summarised in one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from cli.app import (print_note, DEFAULT_N_SEQS, DEFAULT_SEQ_LEN, DeviceMapOpt, DeviceOpt, DtypeOpt, NSeqsOpt, RandomInitOpt, RowsOpt,
                     SeqLenOpt, TextOpt, app, console, loading_status, sequence_progress, user_errors, wrote)
from sa_analysis import defaults

DEFAULT_OUT = Path(defaults.COMPARE_OUT)

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
    random_init: RandomInitOpt = False,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help=f"Output folder. Default: {DEFAULT_OUT}/.")] = None,
    exclude_first: Annotated[int, typer.Option("--exclude-first", min=0, help="Leave the first k key positions (attention sinks) out of every metric.")] = 0,
    rows: RowsOpt = "auto",
    pdf: Annotated[bool, typer.Option("--pdf", help="Also write the figures as PDF.")] = False,
) -> None:
    """Compare the layer x layer attention similarity of several checkpoints of one model (before/after a fine-tune,
    a quantisation, pretraining steps): one heatmap per checkpoint on a shared colour scale, their adjacent-layer
    similarity overlaid, and a summary table.

    With --model, each checkpoint is measured on the same text and its report saved under --out/<label>/; with
    --report, saved reports are compared without any model.
    """
    from sa_analysis.prechecks import parse_rows

    rows = parse_rows(rows, seq_len)
    from sa_analysis.pipeline import CaptureSpec, ModelSpec, TextSpec, run_compare

    def measuring(name: str, spec: str) -> None:
        console.print(f"[bold]{escape(name)}[/]: {escape(spec)}", highlight=False)

    result = run_compare(model or (), report or (), label, placement=ModelSpec(None, device, dtype, random_init, device_map),
                         text=TextSpec(text, n_seqs, seq_len),
                         capture=CaptureSpec(exclude_first, rows=rows, formats=("png", "pdf") if pdf else ("png",)),
                         metric=metric, span_len=span_len, out=out, on_model=measuring, progress=sequence_progress,
                         status=loading_status, notice=print_note)
    rows, out_dir, written = result.rows, result.out, result.files
    _print_table(rows, metric, span_len)
    if len({r["token_sha1"] for r in rows}) > 1:
        console.print("Note: these inputs were measured on different token ids (another text, length or tokenizer), so "
                      "their differences mix checkpoint and data.", style="yellow", highlight=False)
    console.print(f"[bold]Comparison[/] of {len(rows)} checkpoints in [cyan]{out_dir}[/]:")
    wrote(written)


def _fmt(value: float) -> str:
    return "inf" if np.isposinf(value) else ("n/a" if not np.isfinite(value) else f"{value:.3f}")


def _print_table(rows: list[dict], metric: str, span_len: int) -> None:
    from sa_analysis.prechecks import check_metric

    info = check_metric(metric)
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
