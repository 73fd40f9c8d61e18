"""The distillation heal: train the shared model toward the model the user had, not toward the text.

An LM-loss heal lowers perplexity on its text by changing the model (its next-token KL to the untouched model can
grow while perplexity falls). Distillation aims at what sharing broke: the loss is KL(untouched || shared) of the
next-token distributions at every non-padding position (Minitron heals pruned models this way; SwiftKV and EchoAtt
heal cross-layer sharing this way). It needs no labels, so any text serves. The teacher is the same weights with the
LoRA adapters off and the patch lifted (`SharedAttentionHandle.suspended`): one extra forward, no extra memory; a full
fine-tune changes the weights themselves, so it keeps a frozen copy of the untouched model. Temperature 1.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from .data import IGNORE_INDEX

Teacher = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [b, T], mask [b, T]) -> logits [b, T, V]


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where `mask` [b, T] is 1 of KL(teacher || student) of the next-token distributions,
    from logits [b, T, V] (computed in float32); a scalar with the student's gradient."""
    student = torch.log_softmax(student_logits.float(), dim=-1)  # [b, T, V]
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)  # [b, T]
    weights = mask.to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits [b, T, V] against labels [b, T] (IGNORE_INDEX: no loss)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                             ignore_index=IGNORE_INDEX)


def untouched_teacher(model: torch.nn.Module, peft_model: Any, handle: Any) -> Teacher:
    """The untouched model's logits, from the LoRA-adapted, patched `model` itself: adapters off, patch lifted."""
    def teacher(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), peft_model.disable_adapter(), handle.suspended():
            return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return teacher


def frozen_teacher(model: torch.nn.Module) -> Teacher:
    """The untouched model's logits from a frozen copy made now (before a full fine-tune changes the weights)."""
    frozen = copy.deepcopy(model).requires_grad_(False).eval()

    def teacher(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return frozen(input_ids=ids, attention_mask=mask, use_cache=False).logits

    return teacher


def distill_trainer(teacher: Teacher, lm_weight: float, **trainer_kwargs: Any):
    """A `transformers.Trainer` whose loss is `token_kl` to the teacher (+ `lm_weight` x `lm_loss`): the Trainer's
    documented extension point (`compute_loss`), everything else (schedule, accumulation, precision, processes,
    checkpoints) the Trainer's own."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
            loss = token_kl(outputs.logits, teacher(ids, mask), mask)
            if lm_weight:
                loss = loss + lm_weight * lm_loss(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss

    trainer = DistillTrainer(**trainer_kwargs)
    trainer.model_accepts_loss_kwargs = False  # a mean per micro-batch: the Trainer divides by the accumulation steps
    return trainer
