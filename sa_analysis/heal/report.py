"""The heal report: perplexities on each held-out text before and after, against a control; the losses, the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..artefact import JsonArtefact
from ..stats import percent
from .evaluate import closed_fraction, gap, gap_interval

REPORT_FORMAT = "sa-analysis/heal-report"
FORMAT_VERSION = 2  # 2: perplexities per held-out text, the control heal, the gaps (1 had one text and no control)


@dataclass
class HealReport(JsonArtefact):
    """What a heal did to the model's quality, judged honestly.

    `evals[name]` for each held-out text ("heal data, held out": the held-out part of the text the heal trained on;
    "other text": a text of another kind): what it is (`text`, the batch described) and `perplexity` of `baseline`
    (untouched, unshared), `patched` (shared, before healing), `healed` (shared, after) and, when the control ran,
    `control` (unshared, fine-tuned with the same data, steps, adapters and seed); `nll`: the same per sequence. `control`: how the control was
    had ({"status": "run" | "cached" | "skipped", "key", "seconds"}), None for the control's own report.
    """

    FORMAT: ClassVar[str] = REPORT_FORMAT
    VERSION: ClassVar[int] = FORMAT_VERSION
    WHAT: ClassVar[str] = "heal report"
    FILE: ClassVar[str] = "heal_report.json"
    MADE_BY: ClassVar[str] = "`sa-analyze heal`"

    model: dict[str, Any]
    plan: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    evals: dict[str, dict[str, Any]]
    losses: list[float]
    run: dict[str, Any]  # steps, resumed_from, seconds, tokens, tokens_per_s, world_size, device, peak memory
    control: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def measured_against_control(self) -> bool:
        return all("control" in e["perplexity"] for e in self.evals.values()) and bool(self.evals)

    def gaps(self, name: str) -> dict[str, float | None]:
        """For one held-out text: what sharing cost before healing (shared vs untouched) and after it (healed shared vs
        the control), in nats per token, and the share of that gap healing closed (None without a control)."""
        p, nll = self.evals[name]["perplexity"], self.evals[name].get("nll") or {}
        before = gap(p["patched"], p["baseline"])
        after = gap(p["healed"], p["control"]) if "control" in p else None
        found = {"before": before, "after": after,
                 "closed": None if after is None else closed_fraction(before, after),
                 "fine_tuning": gap(p["baseline"], p["control"]) if "control" in p else None}
        for which, shared, unshared in (("before", "patched", "baseline"), ("after", "healed", "control")):
            if shared in nll and unshared in nll and len(nll[shared]) > 1:  # paired over sequences, 95 %
                _mean, found[f"{which}_low"], found[f"{which}_high"] = gap_interval(nll[shared], nll[unshared])
        return found

    def judge(self, control: dict[str, Any] | None) -> None:
        """Put the control's healed perplexity beside each text's (`perplexity["control"]`) and say how it was had
        (`heal.control.run_control`); without one, say that recovery was not measured."""
        if control is None:
            self.control = {"status": "skipped"}
            self.notes.append("no control heal: recovery is not measured (the healed shared model is not compared with "
                              "the unshared model fine-tuned the same way)")
            return
        for name, values in control["perplexity"].items():
            if name in self.evals:
                self.evals[name]["perplexity"]["control"] = float(values["healed"])
                if "nll" in control and name in control["nll"]:
                    self.evals[name].setdefault("nll", {})["control"] = list(control["nll"][name])
        self.control = {k: control.get(k) for k in ("status", "key", "seconds", "steps")}

    def summary(self) -> str:
        parts = []
        for name in self.evals:
            g = self.gaps(name)
            if g["after"] is None:
                parts.append(f"{name}: sharing costs {_percent(g['before'])} before healing; recovery not measured "
                             f"(no control heal)")
            else:
                closed = ("there was no gap to close" if g["closed"] is None else
                          f"healing closed {100 * g['closed']:.0f}% of the gap")
                parts.append(f"{name}: sharing costs {_percent(g['before'])} before healing, {_percent(g['after'])} "
                             f"against the control after it; {closed}")
        return f"{'; '.join(parts)} ({self.run['steps_run']} steps, {self.run['seconds']:.0f} s)"


def _percent(nats: float) -> str:
    """A gap in nats as the perplexity change it means ("+7.1%")."""
    return f"{percent(nats):+.1f}%"
