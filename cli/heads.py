"""`sa-analyze heads`: which heads, anywhere in the model, attend alike (a clustermap and a table of families)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import (AnalysisSeqLenOpt, DEFAULT_MODEL, DEFAULT_N_SEQS, DeviceMapOpt, DeviceOpt, DtypeOpt, NSeqsOpt,
                     OptionalModelOpt, OutOpt, RandomInitOpt, RowsOpt, TextOpt, app, console, loading_status, print_note,
                     sequence_progress, user_errors, wrote)

SHOWN = 15  # families listed in the table (the JSON holds them all)


@app.command("heads")
@user_errors
def heads(
    report: Annotated[Optional[Path], typer.Option("--report", "-r", help="A report.json written by `sa-analyze heatmap` (no model needed).")] = None,
    model: OptionalModelOpt = None,
    metric: Annotated[str, typer.Option("--metric", help="cosine_flat, cosine_row (distance 1 - cosine) or kl (symmetrised).")] = "cosine_flat",
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Distance at which the tree is cut into families (default 0.3 for cosines, 1.0 nats for kl).")] = None,
    out: OutOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: AnalysisSeqLenOpt = None,
    random_init: RandomInitOpt = False,
    device_map: DeviceMapOpt = None,
    rows: RowsOpt = "auto",
) -> None:
    """Cluster every (layer, head) by how alike they attend: head_families.png (a clustermap) and head_families.json."""
    from sa_analysis.prechecks import check_before_loading, check_family_options, parse_rows

    check_family_options(metric, threshold)
    if report is None:  # mistakes that need no model are answered before torch is imported
        rows = parse_rows(rows, seq_len)
        check_before_loading(model or DEFAULT_MODEL, text=text, seq_len=seq_len)
    from sa_analysis.pipeline import CaptureSpec, ModelSpec, TextSpec, run_heads

    source = ModelSpec(model or (None if report is not None else DEFAULT_MODEL), device, dtype, random_init, device_map)
    shown_while_measuring = dict(progress=sequence_progress, status=loading_status, notice=print_note) if report is None else {}
    result = run_heads(report, source, TextSpec(text, n_seqs, seq_len), CaptureSpec(rows=rows), metric=metric,
                       threshold=threshold, out=out, **shown_while_measuring)
    print_families(result.families)
    wrote(result.files)


def print_families(families) -> None:
    """The largest families: members, layers, how alike, whether the planner's head maps follow them."""
    sampled = any("stays_together" in row for row in families.table)
    within = "mean symmetrised KL" if families.metric == "kl" else "mean cosine"
    table = Table(title=f"Head families ({len(families.table)} of two or more heads; the largest {min(SHOWN, len(families.table))})")
    columns = ["family", "heads", "layers", "members", within, "head maps follow"] + (["stays together"] if sampled else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("members", "layers") else "right", overflow="fold")
    for row in families.table[:SHOWN]:
        members = ", ".join(f"L{l}H{h}" for l, h in row["members"][:8]) + (" ..." if row["size"] > 8 else "")
        follow = "-" if row["head_maps_follow"] is None else f"{row['head_maps_follow']:.0%}"
        cells = [str(row["family"]), str(row["size"]), f"{row['first_layer']}-{row['last_layer']} ({len(row['layers'])})",
                 members, f"{row['within']:.3f}", follow]
        if sampled:
            cells.append(f"{row['stays_together']:.0%}")
        table.add_row(*cells)
    console.print(table)
    console.print("head maps follow: share of a family's heads in a later layer whose planner head map (Hungarian, to the "
                  "family's nearest earlier layer) points at a family member"
                  + ("; stays together: share of re-clusterings, similarity drawn within its standard errors, that "
                     "keep each pair of members together" if sampled else ""), highlight=False)
