"""What measured output damage is, as data: `Damage`, one patched run against the baseline per sequence, and
`Summary`, its means with 95 % intervals (calibration or held-out), and `PlanDamage`, the record of a plan's damage
that the planner, the plan JSON, the CLI tables, the figures and `validate` all read. Needs the standard library only
(the planner's `SharePlan` carries a `PlanDamage`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..artefact import Record
from ..errors import UserError
from ..stats import interval

MEASURED_BASIS = "next-token KL(baseline || patched) and NLL change on calibration tokens, 95 % intervals over sequences"
SEARCH_BASIS = "measured whole on calibration tokens by the plan search"


@dataclass
class Intervals(Record):
    """Mean next-token KL and NLL change over sequences (nats per token) with their 95 % intervals: what every damage
    record below states, written flat ({"kl", "kl_low", "kl_high", "nll_change", ...})."""

    kl: float
    kl_low: float
    kl_high: float
    nll_change: float
    nll_change_low: float
    nll_change_high: float


@dataclass
class Summary(Intervals):
    """A plan's damage summed up over sequences: the intervals, top-1 agreement, and on held-out text the perplexity
    with the interval of its NLL change (written only where measured)."""

    top1: float
    perplexity: float | None = None
    perplexity_low: float | None = None
    perplexity_high: float | None = None

    @classmethod
    def of(cls, kl: list[float], nll_change: list[float], top1: list[float], untouched_nll: float | None = None) -> "Summary":
        """From per-sequence values [S]; `untouched_nll` (the unshared model's mean NLL on the same tokens) adds the
        perplexity exp(untouched NLL + NLL change) with its interval."""
        found = {**interval("kl", kl), **interval("nll_change", nll_change), "top1": float(sum(top1) / len(top1))}
        if untouched_nll is not None:
            for suffix in ("", "_low", "_high"):
                found[f"perplexity{suffix}"] = math.exp(untouched_nll + found[f"nll_change{suffix}"])
        return cls(**found)

    def to_dict(self) -> dict[str, float]:
        return {name: value for name, value in self.__dict__.items() if value is not None or not name.startswith("perplexity")}


@dataclass
class SpanDamage(Intervals):
    """The followers of one anchor measured whole (they interact)."""

    anchor: int


@dataclass
class FollowerDamage(SpanDamage):
    """One follower shared alone with its anchor, by index or through its head map (`way`)."""

    way: str  # "index" or "aligned"


@dataclass
class Prediction(Intervals):
    """The span model's prediction of a plan (`damage.table.predict`): per sequence, the sum over spans of each span
    measured whole, or of its followers alone where it was not (`additive` names those); with intervals."""

    spans: dict[str, SpanDamage]  # "first-last" -> the span measured whole
    additive: list[str]  # spans of two or more followers predicted from their followers alone
    followers: dict[int, FollowerDamage]

    RECORD_MAPS: ClassVar[dict[str, type]] = {"spans": SpanDamage, "followers": FollowerDamage}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "followers": {str(m): v.to_dict() for m, v in self.followers.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prediction":
        found = super().from_dict(data)
        found.followers = {int(m): v for m, v in (found.followers or {}).items()}
        found.spans, found.additive = found.spans or {}, list(found.additive or [])
        return found


@dataclass
class MeasuredAlternative(Record):
    """Another plan with as many shared layers (a similarity planner's), measured whole on the same calibration
    tokens as the recommendation. Written flat: {"followers", "aligned", "kl", "kl_low", ...}."""

    followers: list[int]
    aligned: list[int]  # followers reusing their anchor's heads through a head map
    measured: Summary

    def to_dict(self) -> dict[str, Any]:
        return {"followers": list(self.followers), "aligned": list(self.aligned), **self.measured.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MeasuredAlternative":
        return cls(followers=[int(m) for m in data["followers"]], aligned=[int(m) for m in data.get("aligned") or []],
                   measured=Summary.from_dict(data))


@dataclass
class Damage:
    """Per-sequence output damage of one patched run against the baseline, on the same tokens."""

    kl: list[float]  # [S] mean next-token KL(baseline || patched) per sequence, nats
    nll_change: list[float]  # [S] mean NLL change per sequence (patched - baseline), nats
    top1: list[float]  # [S] share of positions whose most likely next token is unchanged

    @classmethod
    def none(cls, n_seqs: int) -> "Damage":
        """The damage of sharing nothing."""
        return cls([0.0] * n_seqs, [0.0] * n_seqs, [1.0] * n_seqs)

    @property
    def kl_mean(self) -> float:
        return float(sum(self.kl) / len(self.kl))

    @property
    def nll_mean(self) -> float:
        return float(sum(self.nll_change) / len(self.nll_change))

    def to_dict(self) -> dict[str, list[float]]:
        return {"kl": self.kl, "nll_change": self.nll_change, "top1": self.top1}

    def summary(self) -> Summary:
        """Means with their 95 % intervals over sequences (KL and NLL change), and the mean top-1 agreement."""
        return Summary.of(self.kl, self.nll_change, self.top1)


@dataclass
class PlanDamage:
    """A plan's output damage on calibration tokens, and what it rests on.

    `predicted`: the span model's sum (each span measured whole where it was, its followers alone summed where not),
    None where it was not made; `followers[m]` (the prediction's): follower m measured alone with its anchor; `plan`:
    the whole plan as measured (interactions between spans included; the prediction for held-out text); `baselines`:
    the baseline plans measured whole on the same tokens ({method: MeasuredAlternative}). KL and NLL change in nats
    per token. Written as before: the followers beside the prediction, not inside it.
    """

    plan: Summary
    predicted: Prediction | None = None
    n_tokens: int = 0
    n_seqs: int = 0
    baseline_nll: float = 0.0
    basis: str = MEASURED_BASIS
    baselines: dict[str, MeasuredAlternative] = field(default_factory=dict)

    @classmethod
    def of_checked(cls, checked: Mapping[str, Any], n_tokens: int, n_seqs: int, baseline_nll: float,
                   basis: str = MEASURED_BASIS) -> "PlanDamage":
        """From a whole plan as the damage search checked it ({"predicted": Prediction or None, "measured": Summary})."""
        predicted = checked.get("predicted")
        return cls(plan=checked["measured"], predicted=predicted, n_tokens=int(n_tokens), n_seqs=int(n_seqs),
                   baseline_nll=float(baseline_nll), basis=basis)

    @property
    def followers(self) -> dict[int, FollowerDamage]:
        """Each follower measured alone with its anchor (the prediction's; empty where no prediction was made)."""
        return self.predicted.followers if self.predicted is not None else {}

    @property
    def kl(self) -> float:
        """The whole plan's mean next-token KL, nats."""
        return float(self.plan.kl)

    def check_followers(self, followers: list[int]) -> None:
        if self.followers and set(self.followers) != set(followers):
            raise UserError("The plan's predicted damage names other layers than its followers; re-create the plan "
                            "with `sa-analyze recommend-spans`.")

    def to_dict(self) -> dict[str, Any]:
        predicted = {} if self.predicted is None else {k: v for k, v in self.predicted.to_dict().items() if k != "followers"}
        out = {"followers": {str(m): v.to_dict() for m, v in self.followers.items()}, "predicted": predicted,
               "plan": self.plan.to_dict(), "n_tokens": self.n_tokens, "n_seqs": self.n_seqs, "baseline_nll": self.baseline_nll,
               "basis": self.basis}
        if self.baselines:
            out["baselines"] = {name: row.to_dict() for name, row in self.baselines.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlanDamage":
        if not isinstance(data, Mapping) or not isinstance(data.get("plan"), Mapping):
            raise UserError("The plan's damage record has no whole-plan measurement; re-create the plan with "
                            "`sa-analyze recommend-spans`.")
        predicted = data.get("predicted") or None
        if predicted is not None:
            predicted = Prediction.from_dict(predicted)
            predicted.followers = {int(m): FollowerDamage.from_dict(v) for m, v in dict(data.get("followers") or {}).items()}
        return cls(plan=Summary.from_dict(data["plan"]), predicted=predicted, n_tokens=int(data.get("n_tokens", 0)),
                   n_seqs=int(data.get("n_seqs", 0)), baseline_nll=float(data.get("baseline_nll", 0.0)),
                   basis=str(data.get("basis", MEASURED_BASIS)), baselines={name: MeasuredAlternative.from_dict(row) for name, row in dict(data.get("baselines") or {}).items()})
