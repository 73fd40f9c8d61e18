"""`sa-analyze heatmap`: measure a model's attention similarity and draw it, or redraw a saved report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from cli.app import (AnalysisSeqLenOpt, DEFAULT_MODEL, DEFAULT_N_SEQS, DeviceMapOpt, DeviceOpt, DtypeOpt, OptionalModelOpt,
                     NSeqsOpt, OutOpt, RandomInitOpt, RowsOpt, TextOpt, app, console, default_out, loading_status,
                     print_note, sequence_progress, user_errors, wrote)


@app.command("heatmap")
@user_errors
def heatmap(
    model: OptionalModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    random_init: RandomInitOpt = False,
    device_map: DeviceMapOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: AnalysisSeqLenOpt = None,
    out: OutOpt = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Redraw the figures of a saved report.json without running the model.")] = None,
    exclude_first: Annotated[int, typer.Option("--exclude-first", min=0, help="Leave the first k key positions (attention sinks) out of every metric.")] = 0,
    path: Annotated[str, typer.Option("--path", help="auto, maps (materialised maps) or stream (long contexts).")] = "auto",
    rows: RowsOpt = "auto",
    pdf: Annotated[bool, typer.Option("--pdf", help="Also write every figure as PDF.")] = False,
) -> None:
    """Capture per-layer, per-head attention and draw layer x layer similarity heatmaps (cosine, KL, isotropy).

    Writes report.json + report.npz (reusable with --report and by recommend-spans) and the figures under --out.
    """
    from sa_analysis.prechecks import check_before_loading, parse_rows

    formats = ("png", "pdf") if pdf else ("png",)
    if report is None:  # mistakes that need no model are answered before torch is imported
        model = model or DEFAULT_MODEL
        rows = parse_rows(rows, seq_len, path)
        check_before_loading(model, out=default_out(out, model), text=text, seq_len=seq_len)
    from sa_analysis.pipeline import CaptureSpec, ModelSpec, TextSpec, redraw_heatmap, run_heatmap

    if report is not None:
        loaded, written = redraw_heatmap(report, out, formats, model)
        print_summary(loaded)
        console.print(f"[bold]Redrew[/] {loaded.model_name} from {report}:")
        wrote(written)
        return
    out_dir = default_out(out, model)
    result, written = run_heatmap(ModelSpec(model, device, dtype, random_init, device_map), TextSpec(text, n_seqs, seq_len),
                                  CaptureSpec(exclude_first, path, rows, formats), out=out_dir,
                                  progress=sequence_progress, status=loading_status, notice=print_note)
    print_summary(result)
    settings = result.meta.get("settings", {})
    for key in ("length_note", "rows_note"):
        if settings.get(key):
            print_note(settings[key])
    console.print(f"[bold]Report and figures[/] for {result.model_name} in [cyan]{out_dir}[/]:")
    wrote(written)


def print_summary(report) -> None:
    """A per-layer table: similarity and divergence to the next layer, head alignment, entropy, Block Influence."""
    meta = report.meta
    data = report.data
    n_layers = report.n_layers
    cos = report.layer_matrix("cosine_flat")
    kl = report.layer_matrix("kl")
    aligned, _ = report.adjacent_alignment("cosine_flat")
    entropy = report.array("entropy").mean(axis=(0, 2))
    influence = report.arrays.get("block_influence")
    table = Table(title=f"{report.model_name}: {data.get('n_seqs', '?')} x {data.get('seq_len', '?')} tokens of "
                        f"{data.get('source', '?')} ({data.get('split', '')})", title_justify="left")
    se_cos, se_kl = report.layer_matrix_se("cosine_flat"), report.layer_matrix_se("kl")
    sampled = se_cos is not None and se_kl is not None
    columns = ["layer", "cos(l,l+1)", "±seq"] + (["±SE"] if sampled else []) + ["KL(l+1‖l)"]
    columns += (["±SE "] if sampled else []) + ["aligned", "entropy", "BI"]
    for column in columns:
        table.add_column(column.strip(), justify="right", no_wrap=True)
    spread = report.layer_matrix_std("cosine_flat")
    for l in range(n_layers):
        last = l == n_layers - 1
        errors = ([] if not sampled else ["" if last else f"{se_cos[l, l + 1]:.4f}"])
        kl_errors = ([] if not sampled else ["" if last else f"{se_kl[l + 1, l]:.4f}"])
        table.add_row(
            str(l),
            "" if last else f"{cos[l, l + 1]:.3f}",
            "" if last else f"{spread[l, l + 1]:.3f}",
            *errors,
            "" if last else _fmt(kl[l + 1, l]),
            *kl_errors,
            "" if last else f"{aligned[l]:.3f}",
            f"{entropy[l]:.2f}",
            "" if influence is None else f"{influence.mean(axis=0)[l]:.3f}",
        )
    console.print(table)
    best = int(np.nanargmax([cos[l, l + 1] for l in range(n_layers - 1)]))
    sampled_note = "±SE: standard error of the estimate from sampled query rows; " if sampled else ""
    console.print(f"cos: flat cosine, head mean (±seq: spread over sequences); {sampled_note}KL in nats; aligned: cosine after "
                  f"matching heads one-to-one (Hungarian); entropy in nats; BI: Block Influence (1 - cos of a layer's "
                  f"input and output).\nMost alike adjacent layers: {best} and {best + 1} (cosine {cos[best, best + 1]:.3f}).",
                  highlight=False)


def _fmt(value: float) -> str:
    return "inf" if not np.isfinite(value) else f"{value:.3f}"
