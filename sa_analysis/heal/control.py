"""The control heal: the unshared model fine-tuned with the same data, steps, adapters and seed as a heal.

A heal's recovery is judged against it (`HealReport.gaps`): fine-tuning alone changes perplexity, most of all on text
like the training data, so the healed shared model is compared with the healed unshared one, never with the
untouched model. One control serves every plan of a model and recipe, so it is cached under the cache folder
(`SA_ANALYSIS_CACHE`), keyed by the model's weights, the recipe, the training data and the held-out tokens.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..artefact import provenance
from ..gguf_files import cache_root
from ..io import json_safe, read_json, write_json
from .config import HealConfig
from .data import HealData
from .report import HealReport

if TYPE_CHECKING:
    from ..loading import LoadedModel

CONTROL_FOLDER = "controls"
CONTROL_FORMAT = 3  # 3: the control's KL to the untouched model and top-1 agreement; bump when what a control measures changes: older cached controls are then not used


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights (every tensor's name, shape, dtype and first 256 values): tells one
    model's weights from another's without reading all of them."""
    digest = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        head = tensor.detach().reshape(-1)[:256].to("cpu", torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:20]


def control_key(loaded: LoadedModel, config: HealConfig, data: HealData, evals: Mapping[str, Any]) -> str:
    """What makes two controls the same: the weights, the recipe, the training data, the held-out tokens, the
    device type and the releases that compute them."""
    import transformers

    described = {name: batch.describe() if hasattr(batch, "describe") else list(batch.shape) for name, batch in evals.items()}
    recipe = {"format": CONTROL_FORMAT, "weights": weights_fingerprint(loaded.model), "dtype": loaded.info.dtype,
              "device": str(loaded.info.device).split(":")[0], "config": config.to_dict(), "data": data.describe(),
              "evals": described, "torch": torch.__version__, "transformers": transformers.__version__}
    return hashlib.sha1(json.dumps(json_safe(recipe), sort_keys=True).encode()).hexdigest()[:20]


def control_path(key: str) -> Path:
    return cache_root() / CONTROL_FOLDER / f"{key}.json"


def run_control(loaded: LoadedModel, data: HealData, evals: Mapping[str, Any], config: HealConfig, *, use_cache: bool = True,
                heal: Callable[..., HealReport | None] | None = None,
                on_step: Callable[[int, float], None] | None = None) -> dict[str, Any] | None:
    """The control's perplexities {"perplexity": {text: {"baseline", "healed"}}, "nll": {text: healed NLL per
    sequence}, "status": "run" | "cached", "key", "seconds"}: from the cache when this recipe was run before, else by healing `loaded` with nothing shared (its
    weights change: load the model again before healing it with a plan). None on a process other than the main one.
    """
    from ..planner import SharePlan
    from .train import heal as default_heal

    key = control_key(loaded, config, data, evals)
    path = control_path(key)
    if use_cache and path.is_file():
        saved = read_json(path, "cached control heal")
        return {**saved, "status": "cached", "key": key}
    started = time.perf_counter()
    unshared = SharePlan.empty(loaded.info.n_layers, model=loaded.info.shape(), method="control (nothing shared)")
    report = (heal or default_heal)(loaded, unshared, data, evals, config, out=None, export=False, on_step=on_step)
    if report is None:
        return None
    result = {"perplexity": {name: {"baseline": e["perplexity"]["baseline"], "healed": e["perplexity"]["healed"]}
                             for name, e in report.evals.items()},
              "nll": {name: e["nll"]["healed"] for name, e in report.evals.items()},  # per sequence
              "kl": {name: e["kl"]["healed"] for name, e in report.evals.items()},  # faithfulness of the control
              "top1": {name: e["top1"]["healed"] for name, e in report.evals.items()},
              "kl_per_sequence": {name: e["kl_per_sequence"]["healed"] for name, e in report.evals.items()},
              "seconds": round(time.perf_counter() - started, 1), "steps": report.run.get("steps"),
              "losses": report.losses, "meta": provenance(loaded.info.device)}
    if use_cache:
        write_json(path, result)
    return {**result, "status": "run", "key": key}
