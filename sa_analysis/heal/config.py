"""Heal settings: one small dataclass, with the library's defaults (the CLI shows these)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


from ..errors import UserError


METHODS = ("lora", "full")


TRAIN_LAYERS = ("all", "from-anchor")


FULL_SCOPES = ("all", "attention")


DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


GIB = 1024**3


@dataclass
class HealConfig:
    """How to heal. `lr=None` picks 1e-3 for LoRA and 5e-5 for a full fine-tune.

    batch_size is per process (GPU); one optimizer step sees batch_size x grad_accum x processes sequences.
    train_layers="from-anchor" leaves the layers below the first anchor frozen (their outputs do not change
    with sharing; backward then stops at the first anchor, which is cheaper). full_scope="attention" trains only
    the attention projections in a full fine-tune.
    """

    method: str = "lora"
    lora_rank: int = 16
    lora_alpha: float | None = None  # default 2 x rank
    lora_dropout: float = 0.0
    lora_mlp: bool = False  # also adapt gate/up/down projections
    train_layers: str = "all"
    full_scope: str = "all"
    lr: float | None = None
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    warmup_steps: int | None = None  # default: a tenth of the steps
    min_lr_ratio: float = 0.1  # cosine decay to this share of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    mode: str = "fast"  # Shared Attention mode while training and in the export
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        from ..patch import check_mode

        if self.method not in METHODS:
            raise UserError(f"Unknown heal method {self.method!r}; use lora or full.")
        if self.train_layers not in TRAIN_LAYERS:
            raise UserError(f"Unknown train_layers {self.train_layers!r}; use all or from-anchor.")
        if self.full_scope not in FULL_SCOPES:
            raise UserError(f"Unknown full_scope {self.full_scope!r}; use all or attention.")
        check_mode(self.mode)
        for name in ("lora_rank", "steps", "batch_size", "grad_accum", "keep_checkpoints", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}.")
        if self.seq_len < 2:
            raise UserError(f"seq-len must be at least 2; got {self.seq_len}.")
        if self.save_every < 0:
            raise UserError("save-every must be 0 (no checkpoints) or a number of steps.")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"The learning rate must be a positive number; got {self.lr}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"LoRA dropout must lie in [0, 1); got {self.lora_dropout}.")

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.method])

    @property
    def warmup(self) -> int:
        return int(self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10))

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to `min_lr_ratio` x lr at the last step (a pure function of step)."""
        lr = self.learning_rate
        if step < self.warmup:
            return lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def structure(self) -> dict[str, Any]:
        """What a checkpoint's trainable weights depend on (a resumed run must agree on these)."""
        keys = ("method", "lora_rank", "lora_alpha", "lora_mlp", "train_layers", "full_scope", "mode")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learning_rate": self.learning_rate, "warmup": self.warmup}
