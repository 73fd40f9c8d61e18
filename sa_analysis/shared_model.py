"""A shared model on disk: the (healed) weights in their unpatched form plus the plan that patches them.

Folder layout written by `export_shared` (loadable without the training code, and without peft)::

    config.json, model.safetensors, tokenizer files     `save_pretrained` of the unpatched model
    share_plan.json                                      the SharePlan (readable by `SharePlan.load`), plus a
                                                         "shared_model" block: format, mode, base model, heal summary

`load_shared(path)` (and `load_with_plan(spec)`, which the pipeline uses for every `--model`) loads the folder and
applies the plan, so the model it returns computes exactly what the in-memory patched model computed. Followers' `q_proj` /
`k_proj` weights are kept in the file (unused while patched): the folder also loads as an ordinary transformers
model, which is the healed model *without* sharing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from . import compat
from .errors import UserError
from .io import read_json, write_json

if TYPE_CHECKING:
    from .loading import LoadedModel
    from .planner.plan import PlanLike

SHARE_PLAN_FILE = "share_plan.json"
SHARED_FORMAT = "sa-analysis/shared-model"
SHARED_VERSION = 1


def is_shared_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by `export_shared` (it holds `share_plan.json`)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / SHARE_PLAN_FILE).is_file()


def export_shared(loaded: LoadedModel, plan: PlanLike, path: str | Path, *, mode: str = "fast",
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Save `loaded` (a LoadedModel) with its plan as a folder that `load_shared` turns back into the patched model.

    The weights are saved unpatched (every layer's q/k/v/o, so the file is a complete transformers model); a patch
    in force on `loaded` (`loaded.share`) is lifted for the save and applied again afterwards. The folder is written
    next to its final place and renamed into it, so it is complete or absent. Returns the folder.
    """
    from .patch import SHARE_PREFIX, share_attention
    from .planner import SharePlan

    model, tokenizer = loaded.model, loaded.tokenizer
    if not isinstance(plan, SharePlan):
        raise TypeError("export_shared needs a planner.SharePlan")
    if any(hasattr(m, "base_layer") for m in model.modules()):
        raise UserError("The model still holds LoRA adapters; merge them (peft's merge_and_unload) before exporting.")
    handle = getattr(loaded, "share", None)
    was_patched = handle is not None and handle.active
    if compat.attention_implementation(model).startswith(SHARE_PREFIX) and not was_patched:
        raise UserError("This model is patched by a handle the export cannot see; remove the patch (handle.remove()) and export again.")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if was_patched:
        mode = handle.mode
        handle.remove()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # callers show their own progress
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = getattr(loaded, "info", None)
        shared = {"format": SHARED_FORMAT, "version": SHARED_VERSION, "mode": mode,
                  "base_model": getattr(info, "name", None), "base_spec": getattr(info, "spec", None),
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), **dict(meta or {})}
        write_json(tmp / SHARE_PLAN_FILE, {**plan.to_dict(), "shared_model": shared})
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise UserError(f"The shared model could not be written to {path} ({exc.strerror or exc}); choose another --out.") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if was_patched:
            loaded.share = share_attention(model, plan, mode=mode)
    return path


def read_share_plan(path: str | Path):
    """(SharePlan, the "shared_model" block) from a shared-model folder or its share_plan.json."""
    from .planner import SharePlan

    path = Path(path).expanduser()
    file = path / SHARE_PLAN_FILE if path.is_dir() else path
    data = read_json(file, "share plan")
    plan = SharePlan.from_dict(data, source=str(file))
    shared = data.get("shared_model") or {}
    return plan, dict(shared)


def attach_plan(loaded: LoadedModel, folder: str | Path, mode: str | None = None) -> Any:
    """Apply the plan saved in `folder` to `loaded` (a LoadedModel of that folder's weights); sets `loaded.share`.

    Called by `load_with_plan` for folders holding `share_plan.json`. The plan is checked against the loaded
    model's shape (layers, heads, head size), not its name (an exported folder has its own name).
    """
    from .patch import check_mode, share_attention

    plan, shared = read_share_plan(folder)
    info = loaded.info
    if plan.n_layers != info.n_layers:
        raise UserError(f"{folder} holds a plan for {plan.n_layers} layers but its model has {info.n_layers}; the folder is damaged, export it again.")
    for key in ("n_heads", "n_kv_heads", "head_dim", "hidden_size"):
        value = plan.model.get(key)
        if value is not None and int(value) != int(getattr(info, key)):
            raise UserError(f"{folder}'s plan was made for {key}={value} but its model has {getattr(info, key)}; the folder is damaged, export it again.")
    mode = mode or shared.get("mode") or "fast"
    check_mode(mode, f" in {folder}")
    loaded.share = share_attention(loaded.model, plan, mode=mode)
    info.extra["shared"] = {"plan": plan.to_dict(), "mode": mode, "base_model": shared.get("base_model"),
                            "heal": shared.get("heal")}
    info.source = "shared-folder"
    return loaded


def load_with_plan(spec: str, **options) -> Any:
    """`loading.load_model(spec, **options)`, with the saved plan applied when `spec` is a folder written by
    `export_shared` (what `--model PATH` does in every command)."""
    from .loading import load_model

    loaded = load_model(spec, **options)
    if is_shared_folder(spec):
        attach_plan(loaded, Path(spec).expanduser())
    return loaded


def load_shared(path: str | Path, *, device: str | None = None, dtype: str | None = None, mode: str | None = None):
    """Load a folder written by `export_shared` (or `sa-analyze heal`) as a patched LoadedModel.

    `loaded.model` runs with Shared Attention in force; `loaded.share` is its handle (`loaded.share.remove()` gives
    the same weights without sharing); `loaded.info.extra["shared"]` holds the plan. `mode` overrides the saved
    mode (fast or exact). Defaults as in `load_model`: bfloat16 on GPU, float32 on CPU.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass the model folder written by `sa-analyze heal` (it holds {SHARE_PLAN_FILE}).")
    if not (path / SHARE_PLAN_FILE).is_file():
        raise UserError(f"{path} holds no {SHARE_PLAN_FILE}, so it is not a shared model; load it with load_model, or export it with export_shared.")
    loaded = load_with_plan(str(path), device=device, dtype=dtype)
    if mode is not None and mode != loaded.share.mode:
        from .patch import check_mode, share_attention

        check_mode(mode)
        loaded.share.remove()
        loaded.share = share_attention(loaded.model, loaded.share.anchor_of, mode=mode, head_map=loaded.share.head_map)
        loaded.info.extra["shared"]["mode"] = mode
    return loaded


__all__ = ["SHARE_PLAN_FILE", "attach_plan", "export_shared", "is_shared_folder", "load_shared", "load_with_plan",
           "read_share_plan"]
