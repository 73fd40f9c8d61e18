"""What a heal trains: LoRA targets or full-weight parameters, chosen around the plan, and whether they fit."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Sequence

import torch

from .. import parts
from ..errors import UserError
from .config import GIB, HealConfig



ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


FOLLOWER_UNUSED = ("q_proj", "k_proj", "q_norm", "k_norm")  # out of the module tree while patched


def _layer_of_names(model: torch.nn.Module) -> dict[str, int]:
    """{module name: decoder layer index} for every module inside a decoder layer."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, int] = {}
    for index, block in enumerate(parts.decoder_layers(model)):
        prefix = names[id(block)]
        for sub, _ in block.named_modules():
            out[f"{prefix}.{sub}" if sub else prefix] = index
    return out


def lowest_trained(anchor_of: Mapping[int, int], config: HealConfig) -> int:
    """The lowest decoder layer a heal trains: 0, the first anchor ("from-anchor": nothing below it changes with
    sharing) or the first follower ("from-follower")."""
    if not anchor_of or config.train_layers == "all":
        return 0
    return min(anchor_of.values()) if config.train_layers == "from-anchor" else min(anchor_of)


def lora_targets(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig) -> list[str]:
    """Full names of the linear modules that get a LoRA adapter: attention projections (+ MLP) of the trained
    layers, except followers' q_proj / k_proj, which Shared Attention never runs."""
    layer_of = _layer_of_names(model)
    lowest = lowest_trained(anchor_of, config)
    wanted = ATTENTION_PROJ + (MLP_PROJ if config.lora_mlp else ())
    targets = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        layer = layer_of.get(name)
        if layer is None or leaf not in wanted or not isinstance(module, torch.nn.Linear) or layer < lowest:
            continue
        if layer in anchor_of and leaf in FOLLOWER_UNUSED:
            continue
        targets.append(name)
    if not targets:
        raise UserError("No linear q/k/v/o projections were found to adapt with LoRA; use a full fine-tune (--full).")
    return targets


def add_lora(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig):
    """Inject LoRA adapters in place (before patching); returns the peft wrapper (for merging)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA healing needs peft: `pip install peft`, or use a full fine-tune (--full).") from None
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                      lora_dropout=config.lora_dropout, target_modules=lora_targets(model, anchor_of, config), bias="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks a deprecated transformers property
        return get_peft_model(model, lora)


def full_parameters(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) trained by a full fine-tune: everything (or the attention projections) of the trained
    layers, minus followers' unused q/k projections and norms; embeddings, final norm and head only with scope "all"
    and train_layers "all"."""
    layer_of = _layer_of_names(model)
    lowest = lowest_trained(anchor_of, config)
    chosen = []
    for name, param in model.named_parameters():
        module_name = name.rsplit(".", 1)[0]
        pieces = module_name.split(".")
        layer = next((layer_of[".".join(pieces[:i])] for i in range(len(pieces), 0, -1) if ".".join(pieces[:i]) in layer_of), None)
        if layer is None:
            if config.full_scope == "all" and config.train_layers == "all":
                chosen.append((name, param))
            continue
        if layer < lowest:
            continue
        if layer in anchor_of and any(p in FOLLOWER_UNUSED for p in pieces):
            continue
        if config.full_scope == "attention" and not any(p in ATTENTION_PROJ for p in pieces):
            continue
        if config.full_scope == "followers-vo" and not (layer in anchor_of and any(p in ("v_proj", "o_proj") for p in pieces)):
            continue
        chosen.append((name, param))
    return chosen


def free_memory_bytes(device: torch.device) -> int | None:
    """Free memory where training runs: CUDA's free bytes, or MemAvailable from /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def full_finetune_bytes(params: Sequence[torch.nn.Parameter], fp32_states: bool = False) -> dict[str, int]:
    """Bytes of a full fine-tune's state: weights, gradients, AdamW's two moments, in the parameter dtype, or in
    float32 when the run keeps float32 master weights (FSDP with bf16 mixed precision upcasts them)."""
    weights = sum(p.numel() * (4 if fp32_states else p.element_size()) for p in params)
    return {"weights": weights, "gradients": weights, "optimizer": 2 * weights, "total": 4 * weights}


def check_full_fits(params: Sequence[torch.nn.Parameter], device: torch.device, margin: float = 0.9, *,
                    all_params: Sequence[torch.nn.Parameter] | None = None, world: int = 1, sharded: bool = False,
                    gpus: int | None = None, fp32_states: bool = False) -> dict[str, int]:
    """Refuse, in one sentence naming an option that fits, a full fine-tune whose state exceeds free memory.

    Per process: the weights (`all_params`, already resident unless sharded), gradients and two AdamW states of the
    trained `params`; divided by `world` when the weights are sharded (FSDP, ZeRO-3). Activations come on top, so
    only `margin` of the free memory is offered. The sentence suggests FSDP over the fewest GPUs of this host that
    would hold it (`gpus`, default: those visible), else LoRA.
    """
    need = full_finetune_bytes(params, fp32_states)
    every = list(all_params if all_params is not None else params)
    weights = sum(p.numel() * (4 if fp32_states else p.element_size()) for p in every)
    resident = sum(p.numel() * p.element_size() for p in every)  # loaded on this device while this is asked
    state = weights + need["gradients"] + need["optimizer"]  # the whole run's state, unsharded
    per_process = state / world if sharded else state
    free = free_memory_bytes(device)
    capacity = None if free is None else margin * (free + resident)
    if capacity is None or per_process <= capacity:
        return {**need, "free": free, "per_process": int(per_process)}
    shards = math.ceil(state / capacity)
    gpus = torch.cuda.device_count() if gpus is None else gpus
    what = (f"A full fine-tune of {sum(p.numel() for p in params) / 1e6:,.1f}M parameters needs about "
            f"{per_process / GIB:.1f} GiB per {'process' if sharded else 'device'} on {device} (weights, gradients and "
            f"two AdamW states{f', sharded over {world}' if sharded else ''}) but only {capacity / GIB:.1f} GiB is there")
    if device.type == "cuda" and world < shards <= gpus:
        raise UserError(f"{what}; shard it with FSDP over {shards} GPUs (`accelerate launch --num_processes {shards} "
                        f"-m cli.main heal --full --fsdp ...`), or heal with LoRA (--lora, the default).")
    raise UserError(f"{what}; heal with LoRA instead (--lora, the default; --device-map auto spreads a large model "
                    f"over the GPUs of one host), or train fewer weights (--full-scope attention, --train-layers from-anchor).")
