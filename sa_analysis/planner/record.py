"""What measured output damage is, as data: `Damage`, one patched run against the baseline per sequence, and
`Summary`, its means with 95 % intervals (calibration or held-out), and `PlanDamage`, the record of a plan's damage
that the planner, the plan JSON, the CLI tables, the figures and `validate` all read. Needs the standard library only
(the planner's `SharePlan` carries a `PlanDamage`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..artefact import Record
from ..errors import UserError
from ..stats import interval

MEASURED_BASIS = "next-token KL(baseline || patched) and NLL change on calibration tokens, 95 % intervals over sequences"
SEARCH_BASIS = "measured whole on calibration tokens by the plan search"


@dataclass
class Summary(Record):
    """A plan's damage summed up over sequences: mean next-token KL and NLL change (nats per token) with their 95 %
    intervals, top-1 agreement; on held-out text also the perplexity with the interval of its NLL change. Written
    as the flat dict it always was ({"kl", "kl_low", ..., "perplexity_high"}; the perplexity only where measured)."""

    kl: float
    kl_low: float
    kl_high: float
    nll_change: float
    nll_change_low: float
    nll_change_high: float
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

    `followers[m]`: follower m measured alone with its anchor ({"anchor", "way", "kl", "kl_low", "kl_high",
    "nll_change", ...}); `predicted`: the span model's sum (each span measured whole where it was, its followers
    alone summed where not: `spans`, `additive`), with intervals; `plan`: the whole plan as measured (interactions
    between spans included; the prediction for held-out text); `baselines`: the baseline plans measured whole on
    the same tokens ({method: {"followers", "aligned", "kl", ...}}). KL and NLL change in nats per token.
    """

    plan: Summary
    followers: dict[int, dict[str, Any]] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    n_tokens: int = 0
    n_seqs: int = 0
    baseline_nll: float = 0.0
    basis: str = MEASURED_BASIS
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def of_checked(cls, checked: Mapping[str, Any], n_tokens: int, n_seqs: int, baseline_nll: float,
                   basis: str = MEASURED_BASIS) -> "PlanDamage":
        """From a whole plan as the damage search checked it ({"predicted": span model or None, "measured": Summary
        or its dict})."""
        predicted = dict(checked.get("predicted") or {})
        followers = {int(m): dict(v) for m, v in dict(predicted.pop("followers", {}) or {}).items()}
        measured = checked["measured"]
        return cls(plan=measured if isinstance(measured, Summary) else Summary.from_dict(measured), followers=followers, predicted=predicted, n_tokens=int(n_tokens),
                   n_seqs=int(n_seqs), baseline_nll=float(baseline_nll), basis=basis)

    @property
    def kl(self) -> float:
        """The whole plan's mean next-token KL, nats."""
        return float(self.plan.kl)

    def check_followers(self, followers: list[int]) -> None:
        if self.followers and set(self.followers) != set(followers):
            raise UserError("The plan's predicted damage names other layers than its followers; re-create the plan "
                            "with `sa-analyze recommend-spans`.")

    def to_dict(self) -> dict[str, Any]:
        out = {"followers": {str(m): v for m, v in self.followers.items()}, "predicted": self.predicted,
               "plan": self.plan.to_dict(), "n_tokens": self.n_tokens, "n_seqs": self.n_seqs, "baseline_nll": self.baseline_nll,
               "basis": self.basis}
        if self.baselines:
            out["baselines"] = self.baselines
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PlanDamage":
        if not isinstance(data, Mapping) or not isinstance(data.get("plan"), Mapping):
            raise UserError("The plan's damage record has no whole-plan measurement; re-create the plan with "
                            "`sa-analyze recommend-spans`.")
        return cls(plan=Summary.from_dict(data["plan"]), followers={int(m): dict(v) for m, v in dict(data.get("followers") or {}).items()},
                   predicted=dict(data.get("predicted") or {}), n_tokens=int(data.get("n_tokens", 0)),
                   n_seqs=int(data.get("n_seqs", 0)), baseline_nll=float(data.get("baseline_nll", 0.0)),
                   basis=str(data.get("basis", MEASURED_BASIS)), baselines=dict(data.get("baselines") or {}))
