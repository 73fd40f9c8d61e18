"""The validation report: baseline vs patched on held-out text, saved as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping


from .. import defaults
from ..errors import UserError
from ..io import json_safe, read_json, write_json

REPORT_FORMAT = "sa-analysis/validation-report"
FORMAT_VERSION = 1
DEFAULT_TOLERANCE = defaults.TOLERANCE


@dataclass
class ValidationReport:
    """Baseline vs patched on held-out text: quality, pass/fail, measured speed and memory, optional tasks."""

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

    def summary(self) -> str:
        """One line: the verdict and the numbers behind it."""
        q = self.quality
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: perplexity {q['ppl_baseline']:.4g} -> {q['ppl_patched']:.4g} ({100 * q['ppl_change']:+.2f}%, "
                f"tolerance {100 * self.tolerance:.2f}%), next-token KL {q['kl_mean']:.4g} nats, "
                f"top-1 agreement {100 * q['top1_agreement']:.1f}%")

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": FORMAT_VERSION, **json_safe(asdict(self))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "validation report") -> "ValidationReport":
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise UserError(f"{source} is not an sa-analysis validation report; pass a validation.json written by `sa-analyze validate`.")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise UserError(f"{source} is a damaged validation report ({exc}); re-run `sa-analyze validate`.") from None

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ValidationReport":
        return cls.from_dict(read_json(path, "validation report"), source=str(path))
