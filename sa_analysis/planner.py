"""Choose which layers share attention (Shared Attention spans) from a measured AttentionReport.

Semantics (as in the SA reference code): a shared layer, a *follower* `m`, reuses head by head the softmax of the
last non-shared layer before it, its *anchor*; layer 0 is never shared. A plan is therefore fully described by its
set of followers; its anchors and spans (maximal runs of consecutive followers) follow from it.

Predicted cost of a plan = sum over followers `m` of `C[m, anchor(m)]`, where `C` is a per-pair cost matrix
(`cost_matrix`: KL(m || a) by default, or 1 - cosine), optionally combined with measured sensitivity
(`apply_sensitivity`). `plan_spans` minimises that cost exactly by dynamic programming over "next non-shared
layer" in O(L^2 B); `seed_plan`, `adjacent_similarity_plan` and `block_influence_plan` are the baselines it is
compared with, scored with the same cost matrix. This module needs numpy only (no torch, no model).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from .errors import UserError
from .io import read_json, write_json
from .report import AttentionReport

PLAN_FORMAT = "sa-analysis/share-plan"
PLAN_VERSION = 1

COSTS = ("kl", "cosine", "cosine_row", "js")
DEFAULT_BUDGET_FRACTION = 0.25
DEFAULT_CONTEXT_LEN = 4096
_TOL = 1e-9  # relative tolerance when comparing a plan's cost with --max-cost

Budget = Union[int, float, None]
Sensitivity = Union[Mapping[Any, float], np.ndarray, None]


# ======================================================================================================
# Cost matrices
# ======================================================================================================
def cost_matrix(report: AttentionReport, cost: str = "kl") -> np.ndarray:
    """[L, L] cost `C[m, a]` of follower `m` reusing anchor `a` (only `a < m` is used); `inf` means forbidden.

    - `kl`: KL(m || a), head mean, in nats (what the follower's attention loses by taking the anchor's).
    - `cosine` / `cosine_row`: 1 - flat / row-mean cosine similarity, head mean.
    - `js`: the report only holds Jensen-Shannon divergence between adjacent layers, so only `C[m, m-1]` is
      finite; plans with this cost must use spans of length 1 (`plan_spans` enforces `max_span=1`).
    NaN (not measured) is treated as forbidden, like `inf`.
    """
    n = report.n_layers
    if cost == "kl":
        mat = np.array(report.layer_matrix("kl"), dtype=float)
    elif cost == "cosine":
        mat = 1.0 - np.asarray(report.layer_matrix("cosine_flat"), dtype=float)
    elif cost == "cosine_row":
        mat = 1.0 - np.asarray(report.layer_matrix("cosine_row"), dtype=float)
    elif cost == "js":
        adjacent = np.asarray(report.array("js_adjacent"), dtype=float).mean(axis=(0, 2))  # [L-1]
        mat = np.full((n, n), np.inf)
        mat[np.arange(1, n), np.arange(n - 1)] = adjacent
    else:
        raise UserError(f"Unknown cost {cost!r}; choose one of {', '.join(COSTS)}.")
    if mat.shape != (n, n):
        raise UserError(f"The report's {cost} matrix has shape {mat.shape}, expected ({n}, {n}); re-run `sa-analyze heatmap`.")
    return np.where(np.isnan(mat), np.inf, mat)


def apply_sensitivity(costs: np.ndarray, sensitivity: Sensitivity, weight: float = 1.0, mode: str = "add") -> np.ndarray:
    """Combine a cost matrix with measured sensitivity (e.g. quality loss found by validation).

    `sensitivity` can be
      - a dict `{follower: loss}` (applies whatever the anchor) and/or `{(follower, anchor): loss}`,
      - an array `[L]` (per follower) or `[L, L]` (per (follower, anchor)); NaN means "not measured".
    `mode="add"` returns `cost + weight * sensitivity` (unmeasured entries add 0): similarity stays the prior and
    measurements correct it. `mode="replace"` returns `weight * sensitivity` where measured and the cost elsewhere.
    A pair-specific entry wins over a per-follower one. `inf` sensitivity forbids the pair.
    """
    if sensitivity is None:
        return costs
    if mode not in ("add", "replace"):
        raise UserError(f"Unknown sensitivity mode {mode!r}; choose 'add' or 'replace'.")
    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"The sensitivity weight must be a finite number >= 0; got {weight}.")
    sens = _sensitivity_matrix(sensitivity, costs.shape[0])
    if weight == 0:  # 0 * inf would be NaN: a zero weight ignores the measurement entirely
        return costs
    measured = ~np.isnan(sens)
    if mode == "add":
        return costs + weight * np.where(measured, sens, 0.0)
    return np.where(measured, weight * np.where(measured, sens, 0.0), costs)


def _sensitivity_matrix(sensitivity: Mapping[Any, float] | np.ndarray, n: int) -> np.ndarray:
    """[L, L] sensitivity with NaN where nothing was measured."""
    out = np.full((n, n), np.nan)
    if isinstance(sensitivity, Mapping):
        pairs = [(k, v) for k, v in sensitivity.items() if not isinstance(k, (int, np.integer))]
        singles = [(k, v) for k, v in sensitivity.items() if isinstance(k, (int, np.integer))]
        for m, value in singles:
            _check_layer(int(m), n, "sensitivity follower")
            out[int(m), :] = float(value)
        for key, value in pairs:
            if not (isinstance(key, (tuple, list)) and len(key) == 2):
                raise UserError(f"Sensitivity keys must be a follower layer or a (follower, anchor) pair; got {key!r}.")
            m, a = int(key[0]), int(key[1])
            _check_layer(m, n, "sensitivity follower")
            _check_layer(a, n, "sensitivity anchor")
            out[m, a] = float(value)
        return out
    arr = np.asarray(sensitivity, dtype=float)
    if arr.shape == (n,):
        return np.repeat(arr[:, None], n, axis=1)
    if arr.shape == (n, n):
        return arr.copy()
    raise UserError(f"A sensitivity array must have shape ({n},) or ({n}, {n}); got {arr.shape}.")


def _check_layer(layer: int, n: int, what: str) -> None:
    if not 0 <= layer < n:
        raise UserError(f"The {what} {layer} is outside 0..{n - 1}; use layer indices of this model.")


def _resolve_costs(report: AttentionReport, cost: str, sensitivity: Sensitivity, weight: float, mode: str) -> np.ndarray:
    return apply_sensitivity(cost_matrix(report, cost), sensitivity, weight, mode)


# ======================================================================================================
# Plan structure helpers (pure functions of the follower set)
# ======================================================================================================
def anchors_for(followers: Iterable[int], n_layers: int) -> dict[int, int]:
    """{follower: anchor}: each follower reuses the last non-shared layer before it."""
    shared = set(followers)
    anchor_of: dict[int, int] = {}
    last = 0
    for layer in range(n_layers):
        if layer in shared:
            anchor_of[layer] = last
        else:
            last = layer
    return anchor_of


def spans_for(followers: Iterable[int]) -> list[tuple[int, int, int]]:
    """[(anchor, first_follower, last_follower)] for each maximal run of consecutive followers."""
    spans: list[tuple[int, int, int]] = []
    for layer in sorted(set(followers)):
        if spans and spans[-1][2] == layer - 1:
            spans[-1] = (spans[-1][0], spans[-1][1], layer)
        else:
            spans.append((layer - 1, layer, layer))
    return spans


def plan_cost(costs: np.ndarray, followers: Iterable[int]) -> float:
    """Total predicted cost of sharing `followers`: sum of `costs[m, anchor(m)]`."""
    anchor_of = anchors_for(followers, costs.shape[0])
    return float(sum(costs[m, a] for m, a in anchor_of.items()))


def shareable_mask(n_layers: int, first_shareable: int = 1, keep: Iterable[int] = ()) -> np.ndarray:
    """[L] bool: which layers may become followers; raises UserError on contradictory constraints."""
    keep = _as_layers(keep)
    if isinstance(first_shareable, bool) or not isinstance(first_shareable, (int, np.integer)):
        raise UserError(f"first_shareable must be a layer index; got {first_shareable!r}.")
    if first_shareable < 1:
        raise UserError(f"first_shareable must be >= 1 because layer 0 can never be shared; got {first_shareable}.")
    if first_shareable >= n_layers:
        raise UserError(f"first_shareable={first_shareable} leaves no layer to share in a {n_layers}-layer model; choose a value below {n_layers}.")
    bad = [k for k in keep if not 0 <= k < n_layers]
    if bad:
        raise UserError(f"Layers to keep {bad} are outside 0..{n_layers - 1}; use layer indices of this model.")
    mask = np.zeros(n_layers, dtype=bool)
    mask[first_shareable:] = True
    mask[list(keep)] = False
    if not mask.any():
        raise UserError(f"The constraints keep every layer from {first_shareable} to {n_layers - 1}, so nothing can be shared; keep fewer layers or lower first_shareable.")
    return mask


def max_followers(mask: np.ndarray, max_span: int | None) -> int:
    """Most followers possible under the mask and span limit: each run of r shareable layers gives r - r//(M+1)."""
    total, run = 0, 0
    for ok in list(mask) + [False]:
        if ok:
            run += 1
            continue
        total += run if max_span is None else run - run // (max_span + 1)
        run = 0
    return total


def _as_layers(layers: Iterable[int] | None) -> list[int]:
    out = []
    for layer in layers or ():
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise UserError(f"Layer indices must be integers; got {layer!r}.")
        out.append(int(layer))
    return sorted(set(out))


def _check_max_span(max_span: int | None) -> None:
    if max_span is None:
        return
    if isinstance(max_span, bool) or not isinstance(max_span, (int, np.integer)) or max_span < 1:
        raise UserError(f"max_span must be an integer >= 1 (followers per anchor); got {max_span!r}.")


def resolve_budget(budget: Budget, n_layers: int) -> int:
    """Number of layers to share: an int, or a float in (0, 1) meaning that fraction of all layers (rounded half up)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise UserError(f"The budget must be a number of layers or a fraction in (0, 1); got {budget!r}.")
    if isinstance(budget, (float, np.floating)):
        if not math.isfinite(budget) or budget < 0:
            raise UserError(f"The budget must be a number of layers or a fraction in (0, 1); got {budget}.")
        if 0 < budget < 1:
            return int(math.floor(budget * n_layers + 0.5))
        if budget != int(budget):
            raise UserError(f"The budget {budget} is neither a whole number of layers nor a fraction in (0, 1); pass e.g. 8 or 0.25.")
    budget = int(budget)
    if budget < 0:
        raise UserError(f"The budget must be >= 0 layers; got {budget}.")
    return budget


def parse_budget(text: str) -> int | float:
    """Parse a CLI budget: "8" -> 8 layers, "0.25" -> a fraction of the layers."""
    text = text.strip()
    try:
        value: int | float = int(text)
    except ValueError:
        pass
    else:
        resolve_budget(value, 1)  # a negative count is refused here, the upper bound once the model is known
        return value
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--budget must be a number of layers (e.g. 8) or a fraction in (0, 1) (e.g. 0.25); got {text!r}.") from None
    resolve_budget(value, 1_000_000)  # validates the form (range is checked against the model later)
    return value


def parse_layers(text: str | None) -> list[int]:
    """Parse "0,1,31" (ranges like "28-31" allowed) into a sorted list of layer indices."""
    if text is None or not text.strip():
        return []
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise UserError(f"Could not read layer list {text!r}; write indices separated by commas, e.g. 0,1,31 or 28-31.")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        if hi < lo:
            raise UserError(f"The layer range {part!r} runs backwards; write it as {hi}-{lo}.")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


# ======================================================================================================
# The exact optimiser
# ======================================================================================================
def optimal_table(costs: np.ndarray, mask: np.ndarray, max_span: int | None, k_max: int) -> tuple[np.ndarray, np.ndarray]:
    """DP over "next non-shared layer": best[a, k] = least cost of layers a..L-1 given a is non-shared, k followers.

    From non-shared layer `a` the next `n` layers become its followers (all shareable, n <= max_span) and layer
    a+n+1 is the next non-shared one (or the model ends). choice[a, k] is that n (-1: infeasible). O(L^2 k_max).
    Ties keep the smallest n, which leaves followers as deep as possible.
    """
    n_layers = costs.shape[0]
    best = np.full((n_layers + 1, k_max + 1), np.inf)
    choice = np.full((n_layers + 1, k_max + 1), -1, dtype=int)
    best[n_layers, 0] = 0.0
    for a in range(n_layers - 1, -1, -1):
        span_cost = 0.0
        n = 0
        while True:
            b = a + n + 1  # next non-shared layer
            if n > 0:
                span_cost += costs[a + n, a]
            if n <= k_max:
                cand = span_cost + best[b, : k_max + 1 - n]
                better = cand < best[a, n:]
                best[a, n:][better] = cand[better]
                choice[a, n:][better] = n
            if b >= n_layers or not mask[b] or (max_span is not None and n + 1 > max_span) or n + 1 > k_max:
                break
            n += 1
    return best, choice


def _followers_from_choice(choice: np.ndarray, n_share: int) -> list[int]:
    followers, a, k = [], 0, n_share
    n_layers = choice.shape[0] - 1
    while a < n_layers:
        n = int(choice[a, k])
        followers.extend(range(a + 1, a + 1 + n))
        a, k = a + n + 1, k - n
    return followers


def optimal_followers(
    costs: np.ndarray,
    budget: Budget = None,
    max_cost: float | None = None,
    first_shareable: int = 1,
    keep: Iterable[int] = (),
    max_span: int | None = None,
) -> list[int]:
    """The follower set of least total cost on a raw [L, L] cost matrix (see `plan_spans` for the arguments)."""
    costs = np.asarray(costs, dtype=float)
    n_layers = costs.shape[0]
    mask = shareable_mask(n_layers, first_shareable, keep)
    _check_max_span(max_span)
    n_share, threshold = _target(budget, max_cost, n_layers, mask, max_span)
    k_max = max_followers(mask, max_span) if threshold else n_share
    best, choice = optimal_table(costs, mask, max_span, k_max)
    if threshold:
        limit = max_cost + _TOL * max(1.0, abs(max_cost))
        n_share = max(k for k in range(k_max + 1) if best[0, k] <= limit or k == 0)
    elif not np.isfinite(best[0, n_share]):
        raise UserError(f"Every way of sharing {n_share} layers has an infinite cost (e.g. KL across different attention masks); lower the budget or use --cost cosine.")
    return _followers_from_choice(choice, n_share)


def _target(budget: Budget, max_cost: float | None, n_layers: int, mask: np.ndarray, max_span: int | None) -> tuple[int, bool]:
    """(number of followers, threshold mode?) after checking budget / max_cost against the constraints."""
    if budget is not None and max_cost is not None:
        raise UserError("Give either a budget or a max cost, not both; the max cost already decides how many layers to share.")
    if max_cost is not None:
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float, np.integer, np.floating)) or math.isnan(max_cost):
            raise UserError(f"max_cost must be a number >= 0; got {max_cost!r}.")
        if max_cost < 0:
            raise UserError(f"max_cost must be >= 0 (costs are divergences); got {max_cost}.")
        return 0, True
    n_shareable, n_possible = int(mask.sum()), max_followers(mask, max_span)
    if budget is None:  # the default: a quarter of the layers, as many as the constraints allow
        return min(resolve_budget(DEFAULT_BUDGET_FRACTION, n_layers), n_possible), False
    n_share = resolve_budget(budget, n_layers)
    if n_share > n_shareable:
        raise UserError(f"The budget of {n_share} layers exceeds the {n_shareable} layers that may be shared under these constraints; lower the budget.")
    if n_share > n_possible:
        raise UserError(f"With max_span={max_span} at most {n_possible} layers can be shared, fewer than the budget of {n_share}; raise max_span or lower the budget.")
    return n_share, False


# ======================================================================================================
# SharePlan
# ======================================================================================================
@dataclass
class SharePlan:
    """Which layers share attention, why (method, cost, constraints) and what it is predicted to cost and save.

    `followers` is the one source of truth; `anchor_of`, `spans` and `non_shared_layers()` derive from it.
    `follower_costs` holds the predicted cost of each follower (None for a plan written by hand).
    """

    n_layers: int
    followers: list[int]
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "manual"
    cost_name: str | None = None
    follower_costs: dict[int, float] | None = None
    constraints: dict[str, Any] = field(default_factory=dict)
    context_len: int = DEFAULT_CONTEXT_LEN

    def __post_init__(self) -> None:
        self.n_layers = int(self.n_layers)
        if self.n_layers < 1:
            raise UserError(f"A plan needs at least one layer; got n_layers={self.n_layers}.")
        followers = _as_layers(self.followers)
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
        return f"{self.n_shared}/{self.n_layers} layers shared (anchor->followers: {spans}){cost}"

    # ----- predicted savings -----------------------------------------------------------------------------
    def savings(self, context_len: int | None = None, bytes_per_element: int = 2) -> dict[str, Any]:
        """Predicted savings for this model's shape, absolute and as fractions; None where the shape is unknown.

        - K cache: followers drop their K cache; saved share of all KV bytes = n_f * K / (L * (K + V)).
        - Q/K projections: a follower skips q_proj and k_proj, 2 * hidden * (Hq*d + Hkv*d) FLOPs per token,
          compared with all attention projections (q, k, v, o) of all layers.
        - Scores: reusing the anchor's softmax skips QK^T, 2 * Hq * d * n FLOPs per token at context n (only
          when the softmax is materialised; a fast kernel that recomputes SDPA from the anchor's Q, K keeps them).
        """
        n = int(context_len or self.context_len)
        shape = model_shape_numbers(self.model)
        L, nf = self.n_layers, self.n_shared
        out: dict[str, Any] = {"n_shared": nf, "n_layers": L, "context_len": n, "bytes_per_element": bytes_per_element,
                               "kv_cache_fraction_saved": nf / (2 * L),
                               "score_fraction_saved": nf / L}
        hq, hkv, d, hidden = (shape[k] for k in ("n_heads", "n_kv_heads", "head_dim", "hidden_size"))
        if hkv and d:
            k_bytes = hkv * d * bytes_per_element
            out.update(kv_cache_bytes_per_token=L * 2 * k_bytes, k_cache_bytes_saved_per_token=nf * k_bytes,
                       k_cache_bytes_saved_at_context=nf * k_bytes * n)
        if hq and hkv and d and hidden:
            qk = 2 * hidden * (hq * d + hkv * d)
            total_proj = L * 2 * hidden * (2 * hq * d + 2 * hkv * d)
            out.update(qk_proj_flops_saved_per_token=nf * qk, attn_proj_flops_per_token=total_proj,
                       attn_proj_fraction_saved=nf * qk / total_proj)
        if hq and d:
            out.update(score_flops_saved_per_token=nf * 2 * hq * d * n, score_flops_per_token=L * 2 * hq * d * n)
        return out

    # ----- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        costs = self.span_costs
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "n_layers": self.n_layers,
            "method": self.method,
            "cost": self.cost_name,
            "followers": self.followers,
            "non_shared_layers": self.non_shared_layers(),
            "anchor_of": {str(m): a for m, a in self.anchor_of.items()},
            "spans": [
                {"anchor": a, "first": f, "last": l, "predicted_cost": None if costs is None else _num_out(costs[i])}
                for i, (a, f, l) in enumerate(self.spans)
            ],
            "follower_costs": None if self.follower_costs is None else {str(m): _num_out(c) for m, c in self.follower_costs.items()},
            "total_cost": _num_out(self.total_cost),
            "constraints": self.constraints,
            "context_len": self.context_len,
            "savings": self.savings(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "plan") -> "SharePlan":
        """Rebuild and check a plan; derived fields (anchors, spans) must agree with the followers."""
        if not isinstance(data, Mapping) or data.get("format") != PLAN_FORMAT:
            raise UserError(f"{source} is not an sa-analysis share plan; pass a plan.json written by `sa-analyze recommend-spans`.")
        if int(data.get("version", 0)) > PLAN_VERSION:
            raise UserError(f"{source} was written by a newer sa-analysis (plan version {data.get('version')}); upgrade sa-analysis.")
        try:
            raw_costs = data.get("follower_costs")
            plan = cls(
                n_layers=int(data["n_layers"]),
                followers=[int(m) for m in data["followers"]],
                model=dict(data.get("model") or {}),
                method=str(data.get("method", "manual")),
                cost_name=data.get("cost"),
                follower_costs=None if raw_costs is None else {int(m): _num_in(c) for m, c in raw_costs.items()},
                constraints=dict(data.get("constraints") or {}),
                context_len=int(data.get("context_len", DEFAULT_CONTEXT_LEN)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source} is a damaged share plan ({type(exc).__name__}: {exc}); re-create it with `sa-analyze recommend-spans`.") from None
        if "anchor_of" in data and {int(k): int(v) for k, v in data["anchor_of"].items()} != plan.anchor_of:
            raise UserError(f"{source} lists anchors that contradict its followers (a follower reuses the last non-shared layer); re-create the plan.")
        return plan

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SharePlan":
        return cls.from_dict(read_json(path, "plan"), source=str(path))


def _parse_spans(spec: str, n_layers: int) -> list[tuple[int, int]]:
    """[(first, last)] from "23-26,28-30", checked: in range and not overlapping."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError("The spans are empty; write followers as first-last ranges, e.g. --spans 23-26,28-30.")
    spans = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"Could not read span {part.strip()!r}; write followers as first-last ranges, e.g. 23-26,28-30.")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UserError(f"The span {part.strip()} runs backwards; write it as {last}-{first}.")
        if first < 1:
            raise UserError(f"The span {part.strip()} shares layer 0, which has no earlier layer to reuse; start spans at 1 or later.")
        if last >= n_layers:
            raise UserError(f"The span {part.strip()} goes past the last layer ({n_layers - 1}) of this model; use indices 1..{n_layers - 1}.")
        spans.append((first, last))
    spans.sort()
    shared: set[int] = set()
    for first, last in spans:
        overlap = shared & set(range(first, last + 1))
        if overlap:
            raise UserError(f"Layer {min(overlap)} appears in more than one span; list each shared layer once.")
        shared.update(range(first, last + 1))
    return spans


def _num_out(value: float | None) -> float | str | None:
    """JSON-safe number: inf becomes the string "inf" (plain JSON has no infinity)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return float(value)


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


# ======================================================================================================
# Planners
# ======================================================================================================
def make_plan(report: AttentionReport, followers: Sequence[int], method: str, cost: str, costs: np.ndarray,
              constraints: Mapping[str, Any] | None = None) -> SharePlan:
    """A SharePlan for `followers`, with each follower's predicted cost read from `costs` (true anchors)."""
    plan = SharePlan(n_layers=report.n_layers, followers=list(followers), model=model_shape(report), method=method,
                     cost_name=cost, constraints=dict(constraints or {}))
    plan.follower_costs = {m: float(costs[m, a]) for m, a in plan.anchor_of.items()}
    return plan


def evaluate_plan(plan: SharePlan, report: AttentionReport, cost: str = "kl", sensitivity: Sensitivity = None,
                  sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> SharePlan:
    """The same plan with predicted costs from this report (e.g. for a plan written by hand with `from_spans`)."""
    if plan.n_layers != report.n_layers:
        raise UserError(f"The plan has {plan.n_layers} layers but the report's model has {report.n_layers}; use a plan made for this model.")
    costs = _resolve_costs(report, cost, sensitivity, sensitivity_weight, sensitivity_mode)
    return make_plan(report, plan.followers, plan.method, cost, costs, plan.constraints)


def plan_spans(
    report: AttentionReport,
    budget: Budget = None,
    max_cost: float | None = None,
    cost: str = "kl",
    first_shareable: int = 1,
    keep: Iterable[int] = (),
    max_span: int | None = None,
    sensitivity: Sensitivity = None,
    sensitivity_weight: float = 1.0,
    sensitivity_mode: str = "add",
) -> SharePlan:
    """The optimal plan: least total predicted cost for the budget, or most layers within `max_cost`.

    budget: layers to share (int) or a fraction of all layers (float in (0, 1)); default 25% of the layers.
    max_cost: instead of a budget, share as many layers as possible with total cost <= max_cost (cheapest such).
    first_shareable / keep / max_span: no follower below `first_shareable`, none in `keep`, at most `max_span`
    consecutive followers per anchor. sensitivity: measured loss combined with the cost (`apply_sensitivity`).
    """
    if cost == "js":
        if max_span is not None and max_span != 1:
            raise UserError("The js cost is only measured between adjacent layers, so it needs max_span=1; use --cost kl or cosine for longer spans.")
        max_span = 1
    costs = _resolve_costs(report, cost, sensitivity, sensitivity_weight, sensitivity_mode)
    followers = optimal_followers(costs, budget, max_cost, first_shareable, keep, max_span)
    constraints = {"budget": budget, "max_cost": max_cost, "first_shareable": first_shareable, "keep": _as_layers(keep),
                   "max_span": max_span, "sensitivity": sensitivity is not None}
    if sensitivity is not None:
        constraints.update(sensitivity_weight=sensitivity_weight, sensitivity_mode=sensitivity_mode)
    return make_plan(report, followers, "optimal", cost, costs, constraints)


def seed_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", sensitivity: Sensitivity = None,
              sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> SharePlan:
    """The SA reference repo's fixed choice: the `budget` layers just before the final one (which is kept).

    Llama-2-7B (32 layers), budget 8: followers 23..30, all reusing layer 22.
    """
    n_layers = report.n_layers
    n_share = _default_budget(budget, n_layers, cap=max(n_layers - 2, 0))
    if n_share > n_layers - 2:
        raise UserError(f"The seed's plan keeps layers 0 and {n_layers - 1}, so it can share at most {max(n_layers - 2, 0)} layers; lower the budget.")
    followers = list(range(n_layers - 1 - n_share, n_layers - 1))
    costs = _resolve_costs(report, cost, sensitivity, sensitivity_weight, sensitivity_mode)
    return make_plan(report, followers, "seed", cost, costs, {"budget": budget})


def adjacent_similarity_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", first_shareable: int = 1,
                             keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                             sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> SharePlan:
    """Greedy similarity-only grouping: share the layers most like their immediate predecessor.

    Ranks layers by `C[m, m-1]` and takes the cheapest ones (respecting the constraints), ignoring that a
    follower after another follower really reuses an earlier anchor; the predicted cost counts the true anchors.
    """
    costs = _resolve_costs(report, cost, sensitivity, sensitivity_weight, sensitivity_mode)
    score = np.array([np.inf] + [costs[m, m - 1] for m in range(1, report.n_layers)])
    followers = _greedy(score, budget, report.n_layers, first_shareable, keep, max_span, "adjacent-similarity")
    return make_plan(report, followers, "adjacent-similarity", cost, costs,
                     {"budget": budget, "first_shareable": first_shareable, "keep": _as_layers(keep), "max_span": max_span})


def block_influence_plan(report: AttentionReport, budget: Budget = None, cost: str = "kl", first_shareable: int = 1,
                         keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                         sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> SharePlan:
    """ShortGPT-style: share the layers with the lowest Block Influence (1 - cos(hidden in, hidden out))."""
    if not report.has("block_influence"):
        raise UserError("This report has no block_influence statistics, so the ShortGPT-style baseline is unavailable; re-run `sa-analyze heatmap` to capture them.")
    influence = np.asarray(report.arrays["block_influence"], dtype=float).mean(axis=0)
    costs = _resolve_costs(report, cost, sensitivity, sensitivity_weight, sensitivity_mode)
    followers = _greedy(influence, budget, report.n_layers, first_shareable, keep, max_span, "block-influence")
    return make_plan(report, followers, "block-influence", cost, costs,
                     {"budget": budget, "first_shareable": first_shareable, "keep": _as_layers(keep), "max_span": max_span})


def _default_budget(budget: Budget, n_layers: int, cap: int) -> int:
    if budget is None:
        return min(resolve_budget(DEFAULT_BUDGET_FRACTION, n_layers), cap)
    return resolve_budget(budget, n_layers)


def _greedy(score: np.ndarray, budget: Budget, n_layers: int, first_shareable: int, keep: Iterable[int],
            max_span: int | None, name: str) -> list[int]:
    """Take layers in order of increasing score (ties: deeper first), skipping those that break max_span."""
    mask = shareable_mask(n_layers, first_shareable, keep)
    _check_max_span(max_span)
    n_share, _ = _target(budget, None, n_layers, mask, max_span)
    order = sorted((m for m in range(n_layers) if mask[m]), key=lambda m: (float(score[m]), -m))
    chosen: set[int] = set()
    for m in order:
        if len(chosen) == n_share:
            break
        if max_span is None or _run_length(chosen | {m}, m) <= max_span:
            chosen.add(m)
    if len(chosen) < n_share:
        raise UserError(f"The {name} greedy choice cannot place {n_share} followers within max_span={max_span}; raise max_span or lower the budget.")
    return sorted(chosen)


def _run_length(followers: set[int], layer: int) -> int:
    lo, hi = layer, layer
    while lo - 1 in followers:
        lo -= 1
    while hi + 1 in followers:
        hi += 1
    return hi - lo + 1


def compare_plans(report: AttentionReport, optimal: SharePlan, cost: str | None = None, first_shareable: int = 1,
                  keep: Iterable[int] = (), max_span: int | None = None, sensitivity: Sensitivity = None,
                  sensitivity_weight: float = 1.0, sensitivity_mode: str = "add") -> dict[str, SharePlan | str]:
    """The optimal plan and the baselines with the same number of shared layers: {method: plan, or why not}.

    The seed plan ignores the constraints (it is a fixed choice); the greedy baselines respect them.
    """
    cost = cost or optimal.cost_name or "kl"
    n = optimal.n_shared
    keep = _as_layers(keep)
    common = dict(cost=cost, sensitivity=sensitivity, sensitivity_weight=sensitivity_weight, sensitivity_mode=sensitivity_mode)
    constrained = dict(common, first_shareable=first_shareable, keep=keep, max_span=max_span)
    out: dict[str, SharePlan | str] = {"optimal": optimal}
    for name, make in (("seed", lambda: seed_plan(report, n, **common)),
                       ("adjacent-similarity", lambda: adjacent_similarity_plan(report, n, **constrained)),
                       ("block-influence", lambda: block_influence_plan(report, n, **constrained))):
        try:
            out[name] = make()
        except UserError as exc:
            out[name] = str(exc)
    return out


__all__ = [
    "COSTS", "PLAN_FORMAT", "SharePlan", "adjacent_similarity_plan", "anchors_for", "apply_sensitivity",
    "block_influence_plan", "compare_plans", "cost_matrix", "evaluate_plan", "make_plan", "max_followers",
    "model_shape", "optimal_followers", "optimal_table", "parse_budget", "parse_layers", "plan_cost", "plan_spans",
    "resolve_budget", "seed_plan", "shareable_mask", "spans_for",
]
