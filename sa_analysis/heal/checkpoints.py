"""Training checkpoints under OUT/checkpoints: trainable weights, optimizer state and step, to resume from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import UserError
from ..io import read_json, write_json
from .report import FORMAT_VERSION



CHECKPOINT_FORMAT = "sa-analysis/heal-checkpoint"


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint folder (step-NNNNNN with a state.json) under `folder`, or None."""
    folder = Path(folder)
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def save_checkpoint(folder: str | Path, step: int, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Any,
                    losses: Sequence[float], fingerprint: Mapping[str, Any], keep: int = 2) -> Path:
    """Write trainable weights, optimizer state and progress to folder/step-NNNNNN (atomically: temp folder, rename);
    older checkpoints beyond `keep` are deleted."""
    folder = Path(folder)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save({name: p.detach().cpu() for name, p in named}, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "step": step,
                                        "losses": list(losses), "fingerprint": dict(fingerprint)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, named: Sequence[tuple[str, torch.nn.Parameter]], optimizer: Any,
                    fingerprint: Mapping[str, Any]) -> tuple[int, list[float]]:
    """Restore a checkpoint written by `save_checkpoint` into the trainable parameters and optimizer; (step, losses)."""
    state = read_json(path / "state.json", "heal checkpoint")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a heal checkpoint; remove it or heal into another --out.")
    saved = state.get("fingerprint", {})
    differ = [k for k in fingerprint if saved.get(k) != fingerprint[k]]
    if differ:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {fingerprint[k]!r}" for k in differ)
        raise UserError(f"The checkpoint {path} was made with other settings ({details}); resume with the same "
                        f"settings, or start afresh without --resume (or in another --out).")
    weights = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
    params = dict(named)
    if set(weights) != set(params):
        raise UserError(f"The checkpoint {path} holds other trainable weights than this run; start afresh without --resume.")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    return int(state["step"]), [float(x) for x in state.get("losses", [])]
