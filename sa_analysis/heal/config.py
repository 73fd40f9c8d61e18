"""Heal settings: one small dataclass, with the library's defaults (the CLI shows these), and the
`transformers.TrainingArguments` they become."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any


from .. import defaults
from ..choices import check_choice, check_heal_objective
from ..errors import UserError

if TYPE_CHECKING:
    from ..planner.plan import PlanLike


METHODS = ("lora", "full")


TRAIN_LAYERS = ("all", "from-anchor", "from-follower")


FULL_SCOPES = ("all", "attention", "followers-vo")


OBJECTIVES = defaults.HEAL_OBJECTIVES  # lm: next-token loss on the text; distill: KL(untouched || shared) at every position


SHARDING = ("none", "fsdp")  # fsdp: torch's FSDP2 through accelerate (full fine-tunes); DeepSpeed: `deepspeed=CONFIG`


REPORT_TO = ("none", "tensorboard", "wandb")


FSDP_NEEDS_PROCESSES = ("FSDP shards over the GPU processes of `accelerate launch --num_processes N --multi_gpu` (or "
                        "torchrun); this run has one process or runs on CPUs, so drop --fsdp or launch it that way.")


DEFAULT_LR = {"lora": 1e-3, "full": 5e-5}


GIB = 1024**3


def _check_logger_installed(report_to: str) -> None:
    """--report-to tensorboard / wandb needs that package; say so before anything loads."""
    import importlib.util

    needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(report_to, ())
    if needs and not any(importlib.util.find_spec(name) for name in needs):
        raise UserError(f"--report-to {report_to} needs the {needs[0]} package (`pip install {needs[0]}`); or leave --report-to at none.")


@dataclass
class HealConfig:
    """How to heal. `lr=None` picks 1e-3 for LoRA and 5e-5 for a full fine-tune.

    batch_size is per process (GPU); one optimizer step sees batch_size x grad_accum x processes sequences.
    objective="lm" trains on the text's next tokens (Alpaca: the responses); objective="distill" trains the shared
    model toward the untouched one: the loss is KL(untouched || shared) of the next-token distributions at every
    position (the teacher is the same weights with adapters off and the patch lifted: one extra forward; a full
    fine-tune keeps a frozen copy), plus `lm_weight` x the LM loss.
    train_layers="from-anchor" leaves the layers below the first anchor frozen (their outputs do not change
    with sharing; backward then stops at the first anchor, which is cheaper); "from-follower" trains only the first
    follower and the layers after it. full_scope="attention" trains only the attention projections in a full
    fine-tune, "followers-vo" only the followers' value and output projections (what sharing left them). shard="fsdp" shards a full fine-tune over the processes of
    `accelerate launch` / torchrun (FSDP2); `deepspeed` is a DeepSpeed config file (ZeRO-1/2/3) handed to the
    Trainer. report_to: where the Trainer logs (none, tensorboard, wandb).
    """

    method: str = "lora"
    objective: str = "lm"
    lm_weight: float = 0.0  # with objective "distill": weight of the LM loss added to the KL
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
    shard: str = "none"
    deepspeed: str | None = None
    report_to: str = "none"

    def __post_init__(self) -> None:
        from ..patch import check_mode

        check_choice(self.method, METHODS, "heal method", "--heal-method")
        check_heal_objective(self.objective, self.lm_weight)
        if self.full_scope == "followers-vo" and self.method != "full":
            raise UserError("--full-scope followers-vo chooses what a full fine-tune trains; add --full, or adapt with LoRA.")
        check_choice(self.train_layers, TRAIN_LAYERS, "set of layers to train", "--train-layers")
        check_choice(self.full_scope, FULL_SCOPES, "full fine-tune scope", "--full-scope")
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
        check_choice(self.shard, SHARDING, "sharding", "sharding")
        check_choice(self.report_to, REPORT_TO, "logger", "--report-to")
        _check_logger_installed(self.report_to)
        if self.sharded and self.objective == "distill":
            raise UserError("A distillation heal keeps the untouched model beside the trained one, which sharded "
                            "training does not; distil with LoRA (the teacher costs no memory) or --device-map auto.")
        if self.sharded and self.method == "lora":
            raise UserError("Sharded training (FSDP, DeepSpeed) is for full fine-tunes; heal with LoRA on one GPU, "
                            "with --device-map auto across the GPUs of one host, or data parallel (accelerate launch).")
        if self.shard == "fsdp" and self.deepspeed:
            raise UserError("Give either --fsdp or --deepspeed, not both.")
        if self.deepspeed:
            import importlib.util
            from pathlib import Path

            if not Path(self.deepspeed).expanduser().is_file():
                raise UserError(f"The DeepSpeed config {self.deepspeed} does not exist; pass a DeepSpeed JSON config file.")
            if importlib.util.find_spec("deepspeed") is None:
                raise UserError("--deepspeed needs DeepSpeed (`pip install deepspeed`); or shard with --fsdp, which needs nothing more.")

    @property
    def sharded(self) -> bool:
        """Are the weights sharded across processes (FSDP or a DeepSpeed config)?"""
        return self.shard == "fsdp" or bool(self.deepspeed)

    @property
    def trains_head(self) -> bool:
        """Does this heal train the output head (and the embeddings tied to it)? Only a full fine-tune of everything."""
        return self.method == "full" and self.full_scope == "all" and self.train_layers == "all"

    @property
    def learning_rate(self) -> float:
        return float(self.lr if self.lr is not None else DEFAULT_LR[self.method])

    @property
    def warmup(self) -> int:
        return int(self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10))

    def structure(self) -> dict[str, Any]:
        """What a checkpoint's trainable weights depend on (a resumed run must agree on these)."""
        keys = ("method", "objective", "lm_weight", "lora_rank", "lora_alpha", "lora_mlp", "train_layers", "full_scope", "mode")
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "learning_rate": self.learning_rate, "warmup": self.warmup}

    def training_arguments(self, output_dir: str, cpu: bool, bf16: bool, layer_class: str | None = None):
        """The `transformers.TrainingArguments` of this heal: the schedule (linear warm-up, cosine decay to
        `min_lr_ratio` x lr), accumulation, clipping, checkpoints every `save_every` steps (keeping
        `keep_checkpoints`), one log line per step, bf16 autocast where asked, and FSDP2 wrapping each
        `layer_class` (the decoder layer) when sharded."""
        from transformers import TrainingArguments

        sharding: dict[str, Any] = {}
        if self.shard == "fsdp":
            sharding = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": [layer_class],
                                                      "reshard_after_forward": True}}
        elif self.deepspeed:
            sharding = {"deepspeed": self.deepspeed}
        return TrainingArguments(
            output_dir=output_dir, max_steps=self.steps, per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum, learning_rate=self.learning_rate,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": self.min_lr_ratio},
            warmup_steps=self.warmup, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm or 0.0,
            save_strategy="steps" if self.save_every else "no", save_steps=self.save_every or 500,
            save_total_limit=self.keep_checkpoints, seed=self.seed, data_seed=self.seed, logging_strategy="steps",
            logging_steps=1, report_to=[] if self.report_to == "none" else [self.report_to], disable_tqdm=True,
            remove_unused_columns=False, use_cpu=cpu, bf16=bf16, include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0, ddp_find_unused_parameters=False, log_level="error", log_level_replica="error", **sharding)


def check_objective(config: HealConfig, plan: PlanLike) -> None:
    """A distillation heal needs something shared to teach (with nothing shared the student is the teacher)."""
    if config.objective == "distill" and plan is not None and not plan.n_shared:
        raise UserError("A distillation heal with nothing shared has nothing to teach (the student is the teacher); "
                        "give a plan with at least one follower, or heal with --objective lm.")

