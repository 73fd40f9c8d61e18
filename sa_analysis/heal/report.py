"""The heal report: perplexities on each held-out text before and after, against a control; the losses, the run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..artefact import JsonArtefact
from ..stats import percent
from .evaluate import closed_fraction, gap, gap_interval

REPORT_FORMAT = "sa-analysis/heal-report"
FORMAT_VERSION = 3  # 3: faithfulness (KL to the untouched model, top-1 agreement) and the objective; 2: the control
YARDSTICKS = ("vs untouched: the shared model against the model you had (before healing, and healed); vs control: "
              "healed against the unshared model fine-tuned the same way (what sharing costs under that fine-tune; for a "
              "distilled heal the control is the untouched model); KL / top-1: next-token KL(untouched || model) in "
              "nats and top-1 agreement with the untouched model, before -> after healing (0 and 100 %: the model you had)")


@dataclass
class HealReport(JsonArtefact):
    """What a heal did to the model's quality, judged honestly by three yardsticks.

    `evals[name]` for each held-out text ("heal data, held out": the held-out part of the text the heal trained on;
    "other text": a text of another kind): what it is (`text`, the batch described); for each state of the model,
    `baseline` (untouched, unshared), `patched` (shared, before healing), `healed` (shared, after) and, when judged,
    `control` (the unshared model fine-tuned with the same data, steps, adapters and seed; for a distilled heal, the
    untouched model itself): `perplexity`, `nll` per sequence, and faithfulness, `kl` (mean next-token
    KL(untouched || model), nats; `kl_per_sequence`) and `top1` (agreement with the untouched model's most likely next
    token). `control`: how the control was had ({"status": "run" | "cached" | "untouched" | "skipped", "key",
    "seconds"}), None for the control's own report.
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
    def objective(self) -> str:
        return str(self.config.get("objective", "lm"))

    @property
    def measured_against_control(self) -> bool:
        return all("control" in e["perplexity"] for e in self.evals.values()) and bool(self.evals)

    def gaps(self, name: str) -> dict[str, float | None]:
        """For one held-out text, the three yardsticks: what sharing cost before healing and costs after it against
        the untouched model (`before`, `after_untouched`), after it against the control (`after`, with the share of
        the gap healing closed, `closed`, and what the fine-tune alone did, `fine_tuning`), in nats per token (95 %
        paired intervals over sequences as `*_low` / `*_high`); and faithfulness: `kl_*` and `top1_*` of the patched
        (`before`), healed (`after`) and control (`control`) models against the untouched one. None where not measured."""
        e = self.evals[name]
        p, nll = e["perplexity"], e.get("nll") or {}
        judged = "control" in p
        found: dict[str, float | None] = {
            "before": gap(p["patched"], p["baseline"]), "after_untouched": gap(p["healed"], p["baseline"]),
            "after": gap(p["healed"], p["control"]) if judged else None,
            "fine_tuning": gap(p["baseline"], p["control"]) if judged else None}
        found["closed"] = None if found["after"] is None else closed_fraction(found["before"], found["after"])
        for which, shared, unshared in (("before", "patched", "baseline"), ("after_untouched", "healed", "baseline"),
                                        ("after", "healed", "control")):
            if shared in nll and unshared in nll and len(nll[shared]) > 1:  # paired over sequences, 95 %
                _mean, found[f"{which}_low"], found[f"{which}_high"] = gap_interval(nll[shared], nll[unshared])
        for which, state in (("before", "patched"), ("after", "healed"), ("control", "control")):
            found[f"kl_{which}"] = (e.get("kl") or {}).get(state)
            found[f"top1_{which}"] = (e.get("top1") or {}).get(state)
        return found

    def judge(self, control: dict[str, Any] | None) -> None:
        """Put the control beside each text's healed model (`perplexity`, `nll`, `kl`, `top1` under "control") and say
        how it was had (`heal.control.run_control`). A distilled heal's control is the untouched model itself (what
        distillation restores); an LM heal without a control says that recovery under the same fine-tune was not
        measured."""
        if self.objective == "distill":
            for e in self.evals.values():
                for key in ("perplexity", "nll", "kl", "top1", "kl_per_sequence"):
                    if key in e and "baseline" in e[key]:
                        e[key]["control"] = e[key]["baseline"]
            self.control = {"status": "untouched"}
            return
        if control is None:
            self.control = {"status": "skipped"}
            self.notes.append("no control heal: recovery is not measured under the same fine-tune (the healed shared "
                              "model is compared with the untouched model only)")
            return
        for name, values in control["perplexity"].items():
            if name in self.evals:
                e = self.evals[name]
                e["perplexity"]["control"] = float(values["healed"])
                for key in ("nll", "kl", "top1", "kl_per_sequence"):
                    if key in control and name in control[key]:
                        e.setdefault(key, {})["control"] = control[key][name]
        self.control = {k: control.get(k) for k in ("status", "key", "seconds", "steps")}

    def summary(self) -> str:
        parts = []
        for name in self.evals:
            g = self.gaps(name)
            against = ("" if g["after"] is None or self.objective == "distill"
                       else f", {_percent(g['after'])} against the control")
            faithful = ""
            if g["kl_before"] is not None and g["kl_after"] is not None:
                faithful = (f"; KL to the untouched model {g['kl_before']:.3f} -> {g['kl_after']:.3f} nats, top-1 "
                            f"{100 * g['top1_before']:.0f}% -> {100 * g['top1_after']:.0f}%")
            parts.append(f"{name}: sharing costs {_percent(g['before'])} before healing, {_percent(g['after_untouched'])} "
                         f"against the untouched model after it{against}{faithful}")
        return f"{'; '.join(parts)} ({self.objective} heal, {self.run['steps_run']} steps, {self.run['seconds']:.0f} s)"


def _percent(nats: float) -> str:
    """A gap in nats as the perplexity change it means ("+7.1%")."""
    return f"{percent(nats):+.1f}%"
