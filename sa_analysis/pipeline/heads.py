"""The head-families job: a report (saved, or measured now) -> every (layer, head) clustered, the families table
(head_families.json) and the clustermap (head_families.png)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..io import write_json
from ..planner.families import DRAWS, HeadFamilies, head_families
from ..report import AttentionReport
from .heatmap import check_report_inputs, report_or_measure
from .inputs import Bar, CaptureSpec, ModelSpec, Say, Status, TextSpec


@dataclass
class HeadsResult:
    report: AttentionReport
    families: HeadFamilies
    files: list[Path]


def run_heads(report: str | Path | None, source: ModelSpec | None, text: TextSpec = TextSpec(seq_len=None),
              capture: CaptureSpec = CaptureSpec(), *, metric: str = "cosine_flat", threshold: float | None = None,
              out: Path | None = None, progress: Bar | None = None, status: Status | None = None,
              notice: Say | None = None) -> HeadsResult:
    """Cluster the heads of a saved report (or of `source`, measured now on `text`) and write the table and the
    figure; `progress`, `status`, `notice` as `run_heatmap`."""
    from ..plots.families import plot_head_families

    check_report_inputs(report, source, text)
    att, out_dir, _source, _loaded = report_or_measure(report, source, text, capture, out, progress, status, notice)
    families = head_families(att, metric, threshold, draws=DRAWS)
    table = out_dir / "head_families.json"
    write_json(table, {"model": att.model_name, "metric": metric, "threshold": families.threshold,
                       "sampled": att.sampling is not None, "families": families.table,
                       "labels": families.labels.tolist(), "rows": [list(r) for r in families.rows]})
    figure = plot_head_families(families, out_dir / "head_families.png")
    return HeadsResult(att, families, [table, figure])
