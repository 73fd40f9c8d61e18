"""The validation report: baseline vs patched on held-out text, saved as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Any


from .. import defaults
from ..artefact import JsonArtefact
from ..planner.record import PlanDamage

REPORT_FORMAT = "sa-analysis/validation-report"
FORMAT_VERSION = 1
DEFAULT_TOLERANCE = defaults.TOLERANCE


@dataclass
class ValidationReport(JsonArtefact):
    """Baseline vs patched on held-out text: quality, pass/fail, measured speed and memory, optional tasks."""

    FORMAT: ClassVar[str] = REPORT_FORMAT
    WHAT: ClassVar[str] = "validation report"
    FILE: ClassVar[str] = "validation.json"
    MADE_BY: ClassVar[str] = "`sa-analyze validate`"

    model: dict[str, Any]
    plan: dict[str, Any]
    mode: str
    tolerance: float
    data: dict[str, Any]
    quality: dict[str, float]  # ppl_baseline, ppl_patched, ppl_change, nll_*, kl_mean, top1_agreement, n_tokens
    passed: bool
    speed: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    tasks: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl_change(self) -> float:
        return float(self.quality["ppl_change"])

    @property
    def plan_damage(self) -> PlanDamage | None:
        """The validated plan's damage as measured on the calibration tokens it was chosen on (its prediction for
        this held-out text); None for a plan not chosen by measured damage."""
        raw = self.plan.get("damage")
        return None if raw is None else PlanDamage.from_dict(raw)

    def summary(self) -> str:
        """One line: the verdict and the numbers behind it."""
        q = self.quality
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: perplexity {q['ppl_baseline']:.4g} -> {q['ppl_patched']:.4g} ({100 * q['ppl_change']:+.2f}%, "
                f"tolerance {100 * self.tolerance:.2f}%), next-token KL {q['kl_mean']:.4g} nats, "
                f"top-1 agreement {100 * q['top1_agreement']:.1f}%")
