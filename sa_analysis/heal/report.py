"""The heal report: perplexities before and after, the losses, the run's numbers; saved as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping


from ..errors import UserError
from ..io import read_json, write_json


REPORT_FORMAT = "sa-analysis/heal-report"


FORMAT_VERSION = 1


@dataclass
class HealReport:
    """Baseline, patched and healed perplexity on held-out text, the loss curve, and how the heal ran."""

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

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "heal report") -> "HealReport":
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise UserError(f"{source} is not an sa-analysis heal report; pass a heal_report.json written by `sa-analyze heal`.")
        try:
            return cls(**{k: v for k, v in data.items() if k not in ("format", "version")})
        except TypeError as exc:
            raise UserError(f"{source} is a damaged heal report ({exc}); re-run `sa-analyze heal`.") from None

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "HealReport":
        return cls.from_dict(read_json(path, "heal report"), source=str(path))
