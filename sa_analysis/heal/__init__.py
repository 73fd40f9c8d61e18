"""Heal a shared model: fine-tune with Shared Attention in force, then export the model with its plan.

Sharing costs a little quality; a short fine-tune with the patch applied recovers most of it (the SA paper fine-tunes
Llama-3-8B on Alpaca, loss on the response tokens only). Gradients flow through the followers' reused attention
into their anchors' `q_proj` / `k_proj` (the patch detaches nothing), as in the reference.

    data = load_heal_data("alpaca.jsonl", loaded.tokenizer, seq_len=512)
    report = heal(loaded, plan, data, heldout_batch, HealConfig(steps=200), out="sa-output/heal")
    # loaded.model: healed, LoRA merged, patch in force (loaded.share); out/model: the exported folder

Order of operations (why LoRA applies to the weights actually used):

1. perplexity of the baseline and of the patched model on held-out text, before any weight changes;
2. LoRA adapters are injected *before* patching, into the unpatched attention modules: the follower module that
   the patch swaps in holds the same (now LoRA-wrapped) `v_proj` / `o_proj`, and anchors keep theirs. Followers'
   `q_proj` / `k_proj` get no adapter (the patch takes them out of the module tree: they are never used);
3. the patch is applied and `transformers.Trainer` trains: the schedule (warm-up, cosine decay), gradient
   accumulation, clipping, bf16 autocast on GPU, checkpoints and resume, logging (`report_to`), and the processes
   of `accelerate launch` / torchrun: data parallel, FSDP2 (`shard="fsdp"`) or DeepSpeed (`deepspeed=CONFIG`);
   a model spread with `--device-map` trains in one process (LoRA);
4. the patch is lifted, LoRA is merged into the base weights (sharded runs: the full weights are gathered into
   an unsharded copy on the main process), the patch is applied again, the healed perplexity is measured on exactly
   the weights that are exported (`shared_model.export_shared`).

Gradient checkpointing (activation recomputation) is not supported while patched; "checkpoints" here are the
Trainer's saved states under `out/checkpoints/` (weights or adapters, optimizer, schedule, RNG, data position),
from which `resume=True` continues where an uninterrupted run would be.

Modules: `config` (HealConfig and its TrainingArguments), `data` (training rows, the Trainer's dataset and
collator), `params` (what trains, and whether it fits), `evaluate` (perplexity), `report` (HealReport), `train`
(the run), `control` (the control heal a heal is judged against: the unshared model, the same recipe; cached).
"""

from .config import DEFAULT_LR, FULL_SCOPES, METHODS, TRAIN_LAYERS, HealConfig
from .data import ALPACA_PROMPT, IGNORE_INDEX, HealData, alpaca_example, alpaca_prompt, load_heal_data
from .control import control_key, control_path, run_control, weights_fingerprint
from .evaluate import closed_fraction, gap, perplexity
from .params import add_lora, check_full_fits, free_memory_bytes, full_finetune_bytes, full_parameters, lora_targets
from .report import HealReport
from .train import SETTINGS_FILE, export_healed, heal

__all__ = [
    "ALPACA_PROMPT", "DEFAULT_LR", "FULL_SCOPES", "IGNORE_INDEX", "METHODS", "TRAIN_LAYERS", "HealConfig", "HealData", "HealReport",
    "add_lora", "alpaca_example", "alpaca_prompt", "check_full_fits", "export_healed", "free_memory_bytes",
    "full_finetune_bytes", "full_parameters", "heal", "load_heal_data", "lora_targets", "perplexity",
    "closed_fraction", "control_key", "control_path", "gap", "run_control", "weights_fingerprint", "SETTINGS_FILE",
]
