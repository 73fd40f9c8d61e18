"""AttentionReport: the measured attention statistics of one model on one text, loadable without the model.

A report is a metadata dict plus named numpy arrays (saved as `<stem>.json` + `<stem>.npz`). Everything a
plot or the planner needs is derived from those arrays by the methods below; this module imports no torch.

Array names and shapes (S sequences, L layers, H query heads):

    {metric}_mean, {metric}_std   [L, H, L, H]   for metric in cosine_flat, cosine_row, kl;
                                                 value[l, h, m, g] compares head h of layer l with head g of
                                                 layer m; kl[l, h, m, g] = KL(P[l,h] || P[m,g]) in nats.
    {metric}_layers               [S, L, L]      per sequence, mean over index-matched heads (value[l, h, m, h]).
    entropy                       [S, L, H]      attention entropy in nats, mean over query rows.
    js_adjacent                   [S, L-1, H]    Jensen-Shannon divergence between layer l and l+1, same head.
    block_influence               [S, L]         1 - cos(hidden state in, hidden state out) of each layer.

Sampled query rows (long contexts; `meta["settings"]["rows"]` says how) add standard errors of the estimates:

    {metric}_mean_se              [L, H, L, H]   of {metric}_mean (sampling error only; the spread over sequences is
                                                 {metric}_std).
    {metric}_layers_se            [S, L, L]      of {metric}_layers, per sequence.
    entropy_se, js_adjacent_se    like entropy and js_adjacent.

KL is infinite where the follower attends to keys the other layer masks (sliding window vs global): the arrays
keep `inf` there rather than hiding it.
"""

from __future__ import annotations

import zipfile

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError
from .io import atomic_write, read_json, write_json

REPORT_FORMAT = "sa-analysis/attention-report"
# a report holds at least one layer x layer matrix (what planning and the heatmaps read); a file without any is not one
LAYER_ARRAYS = ("cosine_flat_layers", "cosine_row_layers", "kl_layers")
REPORT_VERSION = 1


@dataclass(frozen=True)
class Metric:
    """How a pairwise attention metric reads: its label, direction and colour map."""

    name: str
    label: str
    similarity: bool  # True: higher means more alike (cosine); False: a divergence (KL), lower means more alike
    cmap: str

    def as_cost(self, values: np.ndarray) -> np.ndarray:
        """Turn values into a cost where 0 means identical (1 - cosine, or the divergence itself)."""
        return 1.0 - values if self.similarity else values


PAIR_METRICS: dict[str, Metric] = {
    "cosine_flat": Metric("cosine_flat", "cosine similarity (flat)", True, "viridis"),
    "cosine_row": Metric("cosine_row", "cosine similarity (row mean)", True, "viridis"),
    "kl": Metric("kl", "KL(row layer ‖ column layer) [nats]", False, "magma_r"),
}


def metric(name: str) -> Metric:
    """Look a pairwise metric up by name, with a clear error for unknown names."""
    try:
        return PAIR_METRICS[name]
    except KeyError:
        raise UserError(f"Unknown metric {name!r}; choose one of {', '.join(PAIR_METRICS)}.") from None


@dataclass
class AttentionReport:
    """Measured attention statistics plus the metadata that says how they were obtained."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    # ----- shape -----------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.meta["model"]["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["model"]["n_heads"])

    @property
    def data(self) -> dict[str, Any]:
        """What the report measured: {"source", "n_seqs", "seq_len", ...} (empty for a report that does not say)."""
        return dict(self.meta.get("data") or {})

    @property
    def seq_len(self) -> int | None:
        """Tokens per measured sequence (None when the report does not say)."""
        value = self.data.get("seq_len")
        return None if value is None else int(value)

    @property
    def model_name(self) -> str:
        return str(self.meta["model"]["name"])

    def has(self, name: str) -> bool:
        return name in self.arrays

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise UserError(f"This report has no {name!r} statistics; re-run `sa-analyze heatmap` to capture them.")
        return self.arrays[name]

    # ----- saving ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `<stem>.json` and `<stem>.npz` atomically; returns both paths."""
        stem = _stem(path)
        npz_path = stem.with_suffix(".npz")
        json_path = stem.with_suffix(".json")
        arrays = {k: np.asarray(v) for k, v in self.arrays.items()}
        atomic_write(npz_path, lambda tmp: _save_npz(tmp, arrays))
        header = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "arrays": npz_path.name, **self.meta}
        write_json(json_path, header)
        return json_path, npz_path

    @classmethod
    def load(cls, path: str | Path) -> "AttentionReport":
        """Load a report from its `.json` or `.npz` file (or their common stem)."""
        stem = _stem(path)
        header = read_json(stem.with_suffix(".json"), "report")
        if not isinstance(header, dict) or header.get("format") != REPORT_FORMAT:
            raise UserError(f"{stem.with_suffix('.json')} is not an sa-analysis attention report; pass a report.json written by `sa-analyze heatmap`.")
        model = header.get("model")
        if not isinstance(model, dict) or not all(k in model for k in ("name", "n_layers", "n_heads")):
            raise UserError(f"{stem.with_suffix('.json')} is a damaged attention report (it does not say which model it measured); re-run `sa-analyze heatmap`.")
        npz_path = stem.with_suffix(".npz")
        try:
            with np.load(npz_path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except FileNotFoundError:
            raise UserError(f"The report arrays {npz_path} are missing; keep the .npz next to its .json.") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"The report arrays {npz_path} could not be read ({type(exc).__name__}); re-run `sa-analyze heatmap`.") from None
        if not any(name in arrays for name in LAYER_ARRAYS):
            raise UserError(f"The report arrays {npz_path} hold none of {', '.join(LAYER_ARRAYS)}; pass the .npz written with its .json by `sa-analyze heatmap`.")
        meta = {k: v for k, v in header.items() if k not in ("format", "version", "arrays")}
        return cls(meta=meta, arrays=arrays)

    # ----- layer x layer views ---------------------------------------------------------------------------
    def layer_matrix(self, name: str, head: int | None = None) -> np.ndarray:
        """[L, L] view: mean over sequences of the index-matched head mean, or of one head when `head` is given."""
        if head is None:
            return self.array(f"{name}_layers").mean(axis=0)
        full = self.array(f"{name}_mean")  # [L, H, L, H]
        return full[:, head, :, head]

    def layer_matrix_std(self, name: str) -> np.ndarray:
        """[L, L] spread over sequences (standard deviation) of the head-mean layer matrix."""
        return self.array(f"{name}_layers").std(axis=0)

    def layer_matrix_se(self, name: str) -> np.ndarray | None:
        """[L, L] standard error of `layer_matrix(name)` from sampled query rows (None when every row was used): the
        sequences' errors are independent, so sqrt(sum of squares) / S."""
        if not self.has(f"{name}_layers_se"):
            return None
        per_sequence = self.arrays[f"{name}_layers_se"].astype(np.float64)  # [S, L, L]
        return np.sqrt((per_sequence**2).sum(axis=0)) / per_sequence.shape[0]

    def head_matrix_se(self, name: str, layer_a: int, layer_b: int) -> np.ndarray | None:
        """[H, H] standard errors of `head_matrix` (None when every row was used)."""
        if not self.has(f"{name}_mean_se"):
            return None
        return self.arrays[f"{name}_mean_se"][layer_a, :, layer_b, :]

    def per_head_layer_matrices_se(self, name: str) -> np.ndarray | None:
        """[H, L, L] standard errors of `per_head_layer_matrices` (None when every row was used)."""
        if not self.has(f"{name}_mean_se"):
            return None
        full = self.arrays[f"{name}_mean_se"]
        return np.stack([full[:, h, :, h] for h in range(full.shape[1])])

    @property
    def sampling(self) -> dict | None:
        """How query rows were sampled (rows, of, fixed, replicates, strata), or None when every row was used."""
        rows = (self.meta.get("settings") or {}).get("rows")
        return rows if isinstance(rows, dict) and rows.get("mode") == "sampled" else None

    def head_matrix(self, name: str, layer_a: int, layer_b: int) -> np.ndarray:
        """[H, H] cross-head values between two layers: [h, g] compares head h of `layer_a` with head g of `layer_b`."""
        return self.array(f"{name}_mean")[layer_a, :, layer_b, :]

    def per_head_layer_matrices(self, name: str) -> np.ndarray:
        """[H, L, L]: one layer x layer matrix per head (index-matched)."""
        full = self.array(f"{name}_mean")
        return np.stack([full[:, h, :, h] for h in range(full.shape[1])])

    def within_layer_head_similarity(self, name: str = "cosine_flat") -> np.ndarray:
        """[L] mean over distinct head pairs of one layer: how alike the heads of a layer are to each other."""
        full = self.array(f"{name}_mean")
        n_heads = full.shape[1]
        off_diagonal = ~np.eye(n_heads, dtype=bool)
        return np.array([full[l, :, l, :][off_diagonal].mean() if n_heads > 1 else np.nan for l in range(full.shape[0])])

    # ----- isotropy --------------------------------------------------------------------------------------
    def isotropy_curve(self, name: str = "cosine_flat", window: int = 1) -> np.ndarray:
        """[L] mean value between layer l and each of its next `window` layers (NaN where none follow).

        For a divergence the direction is KL(later || l): what a later layer would lose by reusing layer l.
        """
        mat = self.layer_matrix(name)
        n = mat.shape[0]
        curve = np.full(n, np.nan)
        for l in range(n - 1):
            later = range(l + 1, min(n, l + 1 + window))
            curve[l] = np.mean([mat[m, l] for m in later])
        return curve

    def span_score(self, name: str, first: int, last: int) -> float:
        """Mean pairwise value between distinct layers of the span first..last (inclusive)."""
        if not 0 <= first < last < self.n_layers:
            raise UserError(f"A span must satisfy 0 <= first < last < {self.n_layers}; got {first}-{last}.")
        mat = self.layer_matrix(name)[first : last + 1, first : last + 1]
        off_diagonal = ~np.eye(mat.shape[0], dtype=bool)
        return float(mat[off_diagonal].mean())

    def off_diagonal_mean(self, name: str = "cosine_flat") -> float:
        """Mean of the finite off-diagonal cells of the head-mean layer matrix (every pair of distinct layers)."""
        mat = np.asarray(self.layer_matrix(name), dtype=float)
        cells = mat[~np.eye(mat.shape[0], dtype=bool)]
        cells = cells[np.isfinite(cells)]
        return float(cells.mean()) if cells.size else float("nan")

    def most_isotropic_span(self, name: str = "cosine_flat", length: int = 4) -> tuple[int, int, float]:
        """(first, last, score) of the run of `length` consecutive layers whose attention is most alike: the highest
        `span_score` for a similarity, the lowest for a divergence (a span with an infinite pair is never chosen
        while a finite one exists)."""
        length = int(min(max(length, 2), self.n_layers))
        if self.n_layers < 2:
            raise UserError("A report of a single layer has no span of layers to compare.")
        similarity = metric(name).similarity
        scored = [(first, first + length - 1, self.span_score(name, first, first + length - 1))
                  for first in range(self.n_layers - length + 1)]
        finite = [s for s in scored if np.isfinite(s[2])] or scored
        return (max if similarity else min)(finite, key=lambda s: s[2])

    # ----- head alignment --------------------------------------------------------------------------------
    def head_alignment(self, name: str, layer_a: int, layer_b: int) -> dict[str, Any]:
        """Best one-to-one head matching between two layers (Hungarian) vs matching heads by index.

        Returns the cross-head matrix, the permutation (`assignment[h]` = head of `layer_b` matched to head h of
        `layer_a`), and the mean value of the aligned and of the index-matched pairs.
        """
        from scipy.optimize import linear_sum_assignment

        m = metric(name)
        cross = self.head_matrix(name, layer_a, layer_b)
        cost = m.as_cost(cross)
        finite = np.where(np.isfinite(cost), cost, np.nanmax(np.where(np.isfinite(cost), cost, 0)) * 10 + 1e9)
        rows, cols = linear_sum_assignment(finite)
        assignment = np.empty(cross.shape[0], dtype=int)
        assignment[rows] = cols
        return {
            "cross": cross,
            "assignment": assignment,
            "aligned": float(cross[rows, cols].mean()),
            "index_matched": float(np.diag(cross).mean()),
        }

    def adjacent_alignment(self, name: str = "cosine_flat") -> tuple[np.ndarray, np.ndarray]:
        """([L-1] aligned, [L-1] index-matched) mean head similarity between each layer and the next."""
        pairs = [self.head_alignment(name, l, l + 1) for l in range(self.n_layers - 1)]
        return np.array([p["aligned"] for p in pairs]), np.array([p["index_matched"] for p in pairs])


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".npz") else path


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as handle:  # a file handle keeps numpy from appending its own .npz suffix
        np.savez_compressed(handle, **arrays)


def compare_summary(reports: list[AttentionReport], labels: list[str] | None = None, name: str = "cosine_flat",
                    span_len: int = 4) -> list[dict[str, Any]]:
    """One row per report (checkpoints of one model): mean off-diagonal and mean adjacent-layer `name`, and the most
    isotropic run of `span_len` layers. Reports of models of different depth cannot be compared layer by layer."""
    metric(name)
    labels = [r.model_name for r in reports] if labels is None else list(labels)
    if len(labels) != len(reports):
        raise UserError(f"Got {len(labels)} labels for {len(reports)} inputs; give one --label per input.")
    depths = {label: r.n_layers for label, r in zip(labels, reports)}
    if len(set(depths.values())) > 1:
        listed = ", ".join(f"{label}: {n}" for label, n in depths.items())
        raise UserError(f"These models have different numbers of layers ({listed}); compare checkpoints of one model (same depth).")
    rows = []
    for label, report in zip(labels, reports):
        adjacent = report.isotropy_curve(name, 1)[:-1]
        finite = adjacent[np.isfinite(adjacent)]
        first, last, score = report.most_isotropic_span(name, span_len)
        data = report.data
        rows.append({"label": label, "model": report.model_name, "n_layers": report.n_layers,
                     "off_diagonal_mean": report.off_diagonal_mean(name),
                     "adjacent_mean": float(finite.mean()) if finite.size else float("nan"),
                     "span": (first, last), "span_score": score, "token_sha1": data.get("token_sha1")})
    return rows


def same_model(model: str, report: AttentionReport) -> bool:
    """Does `model` name the report's model (its name, spec, alias, or the last part of a path or hub id)?"""
    info = report.meta.get("model", {})
    names = {str(info[k]) for k in ("name", "spec", "alias", "hub_id", "path") if info.get(k)}
    forms = {n.lower() for n in names} | {Path(n).name.lower() for n in names}
    return model.lower() in forms or Path(model).name.lower() in forms


def check_report_model(report: AttentionReport, model: str | None) -> None:
    """A `--model` given beside `--report` must name the report's model (None: nothing to check)."""
    if model is not None and not same_model(model, report):
        raise UserError(f"--model {model} does not match the report's model {report.model_name}; drop --model or pass that model's report.")
