"""The heal report: perplexities before and after, the losses, the run's numbers; saved as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Any


from ..artefact import JsonArtefact


REPORT_FORMAT = "sa-analysis/heal-report"


FORMAT_VERSION = 1


@dataclass
class HealReport(JsonArtefact):
    """Baseline, patched and healed perplexity on held-out text, the loss curve, and how the heal ran."""

    FORMAT: ClassVar[str] = REPORT_FORMAT
    WHAT: ClassVar[str] = "heal report"
    FILE: ClassVar[str] = "heal_report.json"
    MADE_BY: ClassVar[str] = "`sa-analyze heal`"

    model: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    eval: dict[str, Any]
    perplexity: dict[str, float]  # baseline, patched, healed
    recovered: float | None
    losses: list[float]
    run: dict[str, Any]  # steps, resumed_from, seconds, tokens, tokens_per_s, world_size, device, peak memory
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.perplexity
        rec = "n/a (sharing cost nothing)" if self.recovered is None else f"{100 * self.recovered:.0f}%"
        return (f"perplexity baseline {p['baseline']:.4g}, patched {p['patched']:.4g}, healed {p['healed']:.4g}: "
                f"recovered {rec} of the loss from sharing in {self.run['steps_run']} steps ({self.run['seconds']:.0f} s)")
