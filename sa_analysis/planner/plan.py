"""SharePlan: a set of followers with its anchors, spans, predicted cost and savings; saved as JSON (also in the SA
reference code's form, the list of layers not shared)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Union


from .. import defaults
from ..artefact import JsonArtefact
from .record import PlanDamage
from ..errors import UserError
from ..report import AttentionReport
from .layers import anchors_for, as_layers, parse_ranges, spans_for
from .masks import layer_windows



PLAN_FORMAT = "sa-analysis/share-plan"


PLAN_VERSION = 1


DEFAULT_CONTEXT_LEN = defaults.CONTEXT_LEN


@dataclass
class SharePlan(JsonArtefact):
    """Which layers share attention, why (method, cost, constraints) and what it is predicted to cost and save.

    `followers` is the one source of truth; `anchor_of`, `spans` and `non_shared_layers()` derive from it.
    `follower_costs` holds the predicted cost of each follower (None for a plan written by hand), under its head map
    where it has one. `head_map` ({follower: [anchor head for each query head]}) makes those followers reuse the
    anchor's heads in that order (head-aligned sharing); a follower without an entry shares by index.
    `index_costs` keeps, for aligned followers, what sharing by index was predicted to cost. `mask_notes` says, per
    follower, when its anchor's attention mask differs from its own (sliding window vs global) and what sharing does
    to it; `notes` what the planner did that the user should know (pairs it forbade, and why). `stability`: the
    planner rerun on bootstrap resamples of the analysed sequences, `{"resamples": N, "same_plan": share of reruns
    giving exactly this plan, "followers": {m: share of reruns choosing m}}` (None: not measured). `damage`: the
    change of the model's output measured on calibration tokens (`damage.record.PlanDamage`: per follower alone
    and their sum, next-token KL and NLL change in nats with 95 % intervals over sequences, and the whole plan as
    measured there, which includes how followers interact); None for a plan made from similarity alone.
    """

    FORMAT: ClassVar[str] = PLAN_FORMAT
    VERSION: ClassVar[int] = PLAN_VERSION
    WHAT: ClassVar[str] = "share plan"
    FILE: ClassVar[str] = "plan.json"
    MADE_BY: ClassVar[str] = "`sa-analyze recommend-spans`"

    n_layers: int
    followers: list[int]
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "manual"
    cost_name: str | None = None
    follower_costs: dict[int, float] | None = None
    constraints: dict[str, Any] = field(default_factory=dict)
    context_len: int = DEFAULT_CONTEXT_LEN
    head_map: dict[int, list[int]] = field(default_factory=dict)
    index_costs: dict[int, float] = field(default_factory=dict)
    mask_notes: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stability: dict[str, Any] | None = None
    damage: PlanDamage | None = None

    def __post_init__(self) -> None:
        self.n_layers = int(self.n_layers)
        if self.n_layers < 1:
            raise UserError(f"A plan needs at least one layer; got n_layers={self.n_layers}.")
        followers = as_layers(self.followers)
        bad = [m for m in followers if not 1 <= m < self.n_layers]
        if bad:
            raise UserError(f"Layers {bad} cannot be shared: followers must lie in 1..{self.n_layers - 1} (layer 0 is never shared).")
        self.followers = followers
        model = dict(self.model or {})
        if model.get("n_layers") is not None and int(model["n_layers"]) != self.n_layers:
            raise UserError(f"The plan says {self.n_layers} layers but its model has {model['n_layers']}; the plan belongs to another model.")
        self.model = {"name": model.pop("name", None), "n_layers": self.n_layers, **{k: v for k, v in model.items() if k != "n_layers"}}
        if self.follower_costs is not None:
            self.follower_costs = {int(m): float(c) for m, c in self.follower_costs.items()}
            if set(self.follower_costs) != set(followers):
                raise UserError("The plan's follower costs do not match its followers; re-create the plan with `sa-analyze recommend-spans`.")
        self.head_map = check_head_map(self.head_map, followers, self.model.get("n_heads"))
        self.index_costs = {int(m): float(c) for m, c in (self.index_costs or {}).items() if int(m) in self.head_map}
        self.mask_notes = {int(m): str(n) for m, n in (self.mask_notes or {}).items() if int(m) in set(followers)}
        self.notes = [str(n) for n in self.notes or []]
        if self.damage is not None:
            self.damage = self.damage if isinstance(self.damage, PlanDamage) else PlanDamage.from_dict(self.damage)
            self.damage.check_followers(followers)
        if self.stability is not None:
            chosen = {int(m): float(v) for m, v in dict(self.stability.get("followers") or {}).items()}
            self.stability = {"resamples": int(self.stability.get("resamples", 0)), "same_plan": float(self.stability.get("same_plan", 0.0)),
                              "followers": {m: v for m, v in chosen.items() if m in set(followers)}}

    # ----- constructors ----------------------------------------------------------------------------------
    @classmethod
    def empty(cls, n_layers: int, model: Mapping[str, Any] | None = None, method: str = "empty") -> "SharePlan":
        """A plan that shares nothing (the baseline; patching with it must leave the model unchanged)."""
        return cls(n_layers=n_layers, followers=[], model=dict(model or {}), method=method, follower_costs={})

    @classmethod
    def from_spans(cls, spec: str, n_layers: int, model: Mapping[str, Any] | None = None) -> "SharePlan":
        """Parse "23-26,28-30": each span a-b shares layers a..b, which reuse layer a-1 (its anchor).

        Under Shared Attention a follower reuses the *last non-shared* layer before it, so adjacent spans such as
        the seed's "23-26,27-30" are accepted and mean followers 23..30, all reusing layer 22.
        """
        spans = _parse_spans(spec, n_layers)
        followers = [m for first, last in spans for m in range(first, last + 1)]
        return cls(n_layers=n_layers, followers=followers, model=dict(model or {}), method="manual",
                   constraints={"spans": spec.strip()})

    # ----- derived views ---------------------------------------------------------------------------------
    @property
    def n_shared(self) -> int:
        return len(self.followers)

    @property
    def anchor_of(self) -> dict[int, int]:
        return anchors_for(self.followers, self.n_layers)

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        return spans_for(self.followers)

    def non_shared_layers(self) -> list[int]:
        """The seed repo's form: indices of layers that keep their own attention."""
        shared = set(self.followers)
        return [layer for layer in range(self.n_layers) if layer not in shared]

    def is_shared(self, layer: int) -> bool:
        return layer in set(self.followers)

    @property
    def aligned_followers(self) -> list[int]:
        """Followers that reuse their anchor's heads through a head map (the rest share by index)."""
        return sorted(self.head_map)

    def spans_spec(self) -> str:
        """The spans in `from_spans` syntax ("23-26,28-30"); empty string for an empty plan."""
        return ",".join(f"{first}-{last}" if last > first else f"{first}" for _, first, last in self.spans)

    @property
    def span_costs(self) -> list[float] | None:
        if self.follower_costs is None:
            return None
        return [float(sum(self.follower_costs[m] for m in range(first, last + 1))) for _, first, last in self.spans]

    @property
    def total_cost(self) -> float | None:
        if self.follower_costs is None:
            return None
        return float(sum(self.follower_costs.values()))

    def summary(self) -> str:
        """One line: how many layers are shared, in which spans, at what predicted cost."""
        spans = ", ".join(f"{a}->{f}-{l}" if l > f else f"{a}->{f}" for a, f, l in self.spans) or "none"
        cost = "" if self.total_cost is None else f", predicted {self.cost_name} {self.total_cost:.4g}"
        if self.damage is not None:  # chosen by measured damage: the whole plan's next-token KL on calibration tokens
            cost = f", next-token KL {self.damage.kl:.4g} nats measured whole"
        aligned = f", head-aligned: {_layers_text(self.aligned_followers)}" if self.head_map else ""
        return f"{self.n_shared}/{self.n_layers} layers shared (anchor->followers: {spans}){aligned}{cost}"

    # ----- predicted savings -----------------------------------------------------------------------------
    def savings(self, context_len: int | None = None, bytes_per_element: int = 2) -> dict[str, Any]:
        """Predicted savings for this model's shape, absolute and as fractions; None where the shape is unknown.

        - KV cache at context n: a follower drops its K cache and keeps its values for as many tokens as its
          anchor's mask holds; a layer with a sliding window w holds min(n, w) tokens. Saved share of all KV bytes
          = sum over followers of (min(n, w_m) + min(n, w_m) - min(n, w_anchor)) / sum over layers of 2 min(n, w_l)
          (n_f / 2L when no layer slides).
        - Q/K projections: a follower skips q_proj and k_proj, 2 * hidden * (Hq*d + Hkv*d) FLOPs per token,
          compared with all attention projections (q, k, v, o) of all layers.
        - Scores: reusing the anchor's softmax skips QK^T, 2 * Hq * d * n FLOPs per token at context n (only
          when the softmax is materialised; a fast kernel that recomputes SDPA from the anchor's Q, K keeps them).
        """
        n = int(context_len or self.context_len)
        shape = model_shape_numbers(self.model)
        L, nf = self.n_layers, self.n_shared
        held = [n if w is None else min(n, w) for w in layer_windows(self.model, L)]  # tokens each layer caches
        saved_tokens = sum(2 * held[m] - held[a] for m, a in self.anchor_of.items())
        out: dict[str, Any] = {"n_shared": nf, "n_layers": L, "context_len": n, "bytes_per_element": bytes_per_element,
                               "kv_cache_fraction_saved": saved_tokens / (2 * sum(held)),
                               "score_fraction_saved": nf / L}
        hq, hkv, d, hidden = (shape[k] for k in ("n_heads", "n_kv_heads", "head_dim", "hidden_size"))
        if hkv and d:
            k_bytes = hkv * d * bytes_per_element
            out.update(kv_cache_bytes_per_token=L * 2 * k_bytes, k_cache_bytes_saved_per_token=nf * k_bytes,
                       kv_cache_bytes_at_context=2 * k_bytes * sum(held),
                       k_cache_bytes_saved_at_context=k_bytes * sum(held[m] for m in self.followers),
                       kv_cache_bytes_saved_at_context=k_bytes * saved_tokens)
        if hq and hkv and d and hidden:
            qk = 2 * hidden * (hq * d + hkv * d)
            total_proj = L * 2 * hidden * (2 * hq * d + 2 * hkv * d)
            out.update(qk_proj_flops_saved_per_token=nf * qk, attn_proj_flops_per_token=total_proj,
                       attn_proj_fraction_saved=nf * qk / total_proj)
        if hq and d:
            out.update(score_flops_saved_per_token=nf * 2 * hq * d * n, score_flops_per_token=L * 2 * hq * d * n)
        return out

    # ----- (de)serialisation -----------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        costs = self.span_costs
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "method": self.method,
            "cost": self.cost_name,
            "followers": self.followers,
            "non_shared_layers": self.non_shared_layers(),
            "anchor_of": {str(m): a for m, a in self.anchor_of.items()},
            "spans": [
                {"anchor": a, "first": f, "last": l, "predicted_cost": None if costs is None else costs[i]}
                for i, (a, f, l) in enumerate(self.spans)
            ],
            "follower_costs": self.follower_costs,
            "total_cost": self.total_cost,
            "head_map": {str(m): list(heads) for m, heads in self.head_map.items()},
            "index_costs": {str(m): c for m, c in self.index_costs.items()},
            "mask_notes": {str(m): n for m, n in self.mask_notes.items()},
            "notes": self.notes,
            "stability": None if self.stability is None else {
                **self.stability, "followers": {str(m): v for m, v in self.stability["followers"].items()}},
            "damage": None if self.damage is None else self.damage.to_dict(),
            "constraints": self.constraints,
            "context_len": self.context_len,
            "savings": self.savings(),
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], source: str) -> "SharePlan":
        """Rebuild and check a plan; derived fields (anchors, spans) must agree with the followers."""
        raw_costs = data.get("follower_costs")
        listed = [int(m) for m in data["followers"]]
        repeated = sorted({m for m in listed if listed.count(m) > 1})
        if repeated:
            raise UserError(f"{source} lists follower{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} "
                            f"more than once; each layer is shared at most once, fix or re-create the plan.")
        plan = cls(
            n_layers=int(data["n_layers"]),
            followers=[int(m) for m in data["followers"]],
            model=dict(data.get("model") or {}),
            method=str(data.get("method", "manual")),
            cost_name=data.get("cost"),
            follower_costs=None if raw_costs is None else {int(m): _num_in(c) for m, c in raw_costs.items()},
            constraints=dict(data.get("constraints") or {}),
            context_len=int(data.get("context_len", DEFAULT_CONTEXT_LEN)),
            head_map=_read_head_map(data.get("head_map"), source),
            index_costs={int(m): _num_in(c) for m, c in (data.get("index_costs") or {}).items()},
            mask_notes={int(m): str(n) for m, n in (data.get("mask_notes") or {}).items()},
            notes=list(data.get("notes") or []),
            stability=data.get("stability"),
            damage=data.get("damage"),
        )
        if "anchor_of" in data and {int(k): int(v) for k, v in data["anchor_of"].items()} != plan.anchor_of:
            raise UserError(f"{source} lists anchors that contradict its followers (a follower reuses the last non-shared layer); re-create the plan.")
        return plan


def _parse_spans(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """[(first, last)] from "23-26,28-30", checked: in range and not overlapping."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("The spans are empty; write followers as first-last ranges, e.g. --spans 23-26,28-30.")
    spans = []
    for first, last in parse_ranges(spec, "span", "followers as first-last ranges, e.g. 23-26,28-30"):
        if first < 1:
            raise UserError(f"The span {first}-{last} shares layer 0, which has no earlier layer to reuse; start spans at 1 or later.")
        if last >= n_layers:
            raise UserError(f"The span {first}-{last} goes past the last layer ({n_layers - 1}) of this model; use indices 1..{n_layers - 1}.")
        spans.append((first, last))
    spans.sort()
    shared: set[int] = set()
    for first, last in spans:
        overlap = shared & set(range(first, last + 1))
        if overlap:
            raise UserError(f"Layer {min(overlap)} appears in more than one span; list each shared layer once.")
        shared.update(range(first, last + 1))
    return spans


def _read_head_map(raw: Any, source: str) -> dict[int, list[int]]:
    """The JSON `head_map` object ({"<follower>": [anchor head, ...]}) as {int: [int]}; one sentence when malformed."""
    if raw is None:
        return {}
    try:
        return {int(m): [int(g) for g in heads] for m, heads in dict(raw).items()}
    except (TypeError, ValueError):
        raise UserError(f"{source} has a malformed head_map; write it as {{\"<follower layer>\": [anchor head for head 0, 1, ...]}}.") from None


def check_head_map(raw: Mapping[Any, Any] | None, followers: Iterable[int], n_heads: Any = None) -> dict[int, list[int]]:
    """{follower: [anchor head per query head]} checked, one sentence when wrong: integers, keys among the
    followers, one entry per query head (`n_heads`, or the maps' own length when unknown), heads in range.
    The plan and the patch (for a plain mapping plan) both check their maps here."""
    try:
        maps = {_whole(m): [_whole(g) for g in heads] for m, heads in dict(raw or {}).items()}
    except (TypeError, ValueError):
        raise UserError("A head map must be {follower layer: [anchor head for each query head]} of integers.") from None
    followers = set(followers)
    lengths = {len(heads) for heads in maps.values()}
    for m, heads in sorted(maps.items()):
        if m not in followers:
            raise UserError(f"The head map names layer {m}, which the plan does not share; map only followers.")
        expected = int(n_heads) if n_heads is not None else max(lengths)
        if len(heads) != expected or not heads:
            raise UserError(f"Follower {m}'s head map lists {len(heads)} heads but the model has {expected} query heads; give one anchor head per query head.")
        bad = [g for g in heads if not 0 <= g < expected]
        if bad:
            raise UserError(f"Follower {m}'s head map names anchor head {bad[0]}, outside 0..{expected - 1}.")
    return dict(sorted(maps.items()))


def _whole(value: Any) -> int:
    if isinstance(value, bool) or int(value) != value:
        raise ValueError(value)
    return int(value)


def _layers_text(layers: list[int]) -> str:
    return ", ".join(map(str, layers))


def _num_in(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # float("inf") reads the string form back


def model_shape(report: AttentionReport) -> dict[str, Any]:
    """Name and shape of the report's model (n_layers, n_heads, n_kv_heads, head_dim, hidden_size; None if unknown)."""
    info = dict(report.meta.get("model", {}))
    shape = {"name": info.get("name"), "n_layers": report.n_layers}
    shape.update(model_shape_numbers(info))
    if info.get("spec"):
        shape["spec"] = info["spec"]  # how the model was named on the command line (alias, path, hub id)
    if info.get("sliding_window") and info.get("layer_types"):
        shape.update(layer_types=list(info["layer_types"]), sliding_window=int(info["sliding_window"]))  # masks count in savings
    return shape


def model_shape_numbers(info: Mapping[str, Any]) -> dict[str, int | None]:
    """n_heads, n_kv_heads, head_dim, hidden_size from a model dict, inferring what follows from the rest."""
    def get(key: str) -> int | None:
        value = info.get(key)
        return int(value) if value is not None else None

    hq, hkv, d, hidden = get("n_heads"), get("n_kv_heads"), get("head_dim"), get("hidden_size")
    hkv = hkv if hkv is not None else hq
    if d is None and hq and hidden:
        d = hidden // hq
    if hidden is None and hq and d:
        hidden = hq * d
    return {"n_heads": hq, "n_kv_heads": hkv, "head_dim": d, "hidden_size": hidden}


PlanLike = Union["SharePlan", Mapping[int, int], str]  # a SharePlan, {follower: anchor}, or spans ("23-26,28-30")
