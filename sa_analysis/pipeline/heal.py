"""The heal job: load, check the plan and the data, fine-tune with sharing in force, report and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..heal import HealConfig, HealReport, heal, load_heal_data
from ..heal.config import FSDP_NEEDS_PROCESSES
from ..io import default_out_dir
from ..loading import resolve_device
from ..planner import SharePlan
from ..prechecks import check_before_loading
from ..shapes import check_seq_len
from ..validate import check_plan_for_model
from .inputs import ModelSpec, Status, TextSpec


@dataclass
class HealStart:
    """What a heal is about to do, for the caller to show: the model, the plan, the data and the processes."""

    model: str
    plan: SharePlan
    data: dict[str, Any]
    processes: int
    dtype: str
    device: str
    mixed_precision: str | None
    main: bool


def run_heal(source: ModelSpec, text: TextSpec, config: HealConfig, *, plan_file: str | Path | None = None,
             spans: str | None = None, data: str | Path | None = None, out: Path | None = None, resume: bool = False,
             status: Status | None = None, on_start: Callable[[HealStart], None] | None = None,
             on_step: Callable[[int, float], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> HealReport | None:
    """Heal `source` for a plan (a plan file or spans), on Alpaca/JSONL/text `data`, evaluated on held-out `text`.

    Several GPUs of one host: run under `accelerate launch --num_processes N` (one process per GPU: data parallel,
    or sharded with `config.shard="fsdp"` / `config.deepspeed`); only the main process returns the report (the
    others return None). `source.device_map` spreads one model over the GPUs instead (one process, LoRA). The weights
    load in float32 on the CPU and for a full fine-tune (bf16 autocast on GPUs), in bfloat16 for LoRA on GPUs, unless
    `source.dtype` says otherwise.
    """
    if (plan_file is None) == (spans is None):
        raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
    out_dir = default_out_dir(out, source.model)
    share_plan = check_before_loading(source.model, out=out_dir, text=text.text, seq_len=max(text.seq_len, config.seq_len),
                                      spans=spans, plan_file=plan_file)
    if data is not None and not Path(data).expanduser().is_file():
        raise UserError(f"The data file {data} does not exist; pass an Alpaca-style JSON/JSONL file or a text file to --data.")
    device = resolve_device(source.device)
    processes = _processes(device)  # under `accelerate launch` / torchrun: one process per GPU (gloo on CPUs)
    if config.shard == "fsdp" and (processes.num_processes < 2 or device.type != "cuda"):
        raise UserError(FSDP_NEEDS_PROCESSES)
    if processes.num_processes > 1:
        if source.device_map is not None:
            raise UserError("--device-map spreads one model over the GPUs in a single process; run it without accelerate launch / torchrun.")
        device = processes.device
    dtype = source.dtype or ("float32" if device.type == "cpu" or config.method == "full" else "bfloat16")
    placed = ModelSpec(source.model, str(device), dtype, source.random_init, source.device_map)
    loaded = placed.load(status if processes.is_main_process else None)
    info = loaded.info
    share_plan = share_plan or SharePlan.from_spans(spans, info.n_layers, model=info.shape())
    check_plan_for_model(share_plan, info)
    check_seq_len(config.seq_len, info.max_positions)
    needed = config.steps * config.batch_size * config.grad_accum * processes.num_processes
    train_data = load_heal_data(data, loaded.tokenizer, seq_len=config.seq_len,
                                vocab_size=None if loaded.tokenizer else info.vocab_size, max_examples=needed)
    eval_batch = text.batch(loaded, "heldout")
    if on_start:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        on_start(HealStart(info.name, share_plan, train_data.describe(), processes.num_processes, info.dtype,
                           info.device, "bf16" if bf16 else "no", processes.is_main_process))
    return heal(loaded, share_plan, train_data, eval_batch, config, out=out_dir, resume=resume, on_step=on_step,
                on_phase=on_phase)


def _processes(device):
    """accelerate's view of the processes this job runs in (one, or those of `accelerate launch` / torchrun)."""
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")
