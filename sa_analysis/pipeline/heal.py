"""The heal job: load, check the plan and the data, heal the control (the unshared model, same recipe; cached), fine-tune
with sharing in force, judge against the control on two held-out texts, report and export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import UserError
from ..data import DEFAULT_TEXT, token_batch
from ..heal.report import YARDSTICKS  # noqa: F401 (for the CLI)
from ..heal import HealConfig, HealReport, control_key, control_path, heal, load_heal_data, run_control
from ..heal.config import FSDP_NEEDS_PROCESSES, check_objective
from ..io import default_out_dir
from ..loading import resolve_device
from ..planner import SharePlan
from ..prechecks import check_before_loading, check_data_file, heal_other_text
from ..shapes import check_seq_len
from ..validate import check_plan_for_model
from .inputs import ModelSpec, Status, TextSpec

if TYPE_CHECKING:
    from ..loading import LoadedModel


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
    evals: dict[str, dict[str, Any]]  # {name: the held-out batch described}
    control: str  # "cached", "to run", "skipped" or "untouched model (distillation)"


def run_heal(source: ModelSpec, other_text: TextSpec, config: HealConfig, *, plan_file: str | Path | None = None,
             spans: str | None = None, data: str | Path | None = None, out: Path | None = None, resume: bool = False,
             status: Status | None = None, on_start: Callable[[HealStart], None] | None = None,
             on_step: Callable[[int, float], None] | None = None,
             on_phase: Callable[[str], None] | None = None, control: bool = True) -> HealReport | None:
    """Heal `source` for a plan (a plan file or spans), on Alpaca/JSONL/text `data` (its calibration part), judged
    against the control heal (`control=False` skips it: recovery is then not measured) on two held-out texts: the
    held-out part of the data ("heal data, held out") and `other_text`, a text of another kind ("other text"; default:
    the standard library's source code, against the default documentation text); its `seq_len` and `n_seqs` size
    both held-out batches.

    Several GPUs of one host: run under `accelerate launch --num_processes N` (one process per GPU: data parallel,
    or sharded with `config.shard="fsdp"` / `config.deepspeed`); only the main process returns the report (the
    others return None). `source.device_map` spreads one model over the GPUs instead (one process, LoRA). The weights
    load in float32 on the CPU and for a full fine-tune (bf16 autocast on GPUs), in bfloat16 for LoRA on GPUs, unless
    `source.dtype` says otherwise.
    """
    if (plan_file is None) == (spans is None):
        raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
    out_dir = default_out_dir(out, source.model)
    share_plan = check_before_loading(source.model, out=out_dir, text=other_text.text,
                                      seq_len=max(other_text.seq_len, config.seq_len),
                                      spans=spans, plan_file=plan_file)
    check_data_file(data)
    heal_other_text(data, other_text.text)  # a mixture of both built-in texts needs a held-out text of another kind
    check_objective(config, share_plan)
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
    evals = heal_evals(loaded, data, other_text)
    control = control and config.objective == "lm"  # a distilled heal's control is the untouched model itself
    status = ("untouched model (distillation)" if config.objective == "distill" else "skipped" if not control else
              "cached" if control_path(control_key(loaded, config, train_data, evals)).is_file() else "to run")
    if on_start:
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        on_start(HealStart(info.name, share_plan, train_data.describe(), processes.num_processes, info.dtype,
                           info.device, "bf16" if bf16 else "no", processes.is_main_process,
                           {name: batch.describe() for name, batch in evals.items()}, status))
    found = None
    if control:
        phase = on_phase or (lambda _name: None)
        phase("control")
        found = run_control(loaded, train_data, evals, config, on_step=on_step)
        if found is not None and found["status"] == "run":  # the control changed these weights: a fresh copy
            loaded = placed.load(None)
        phase("control done")
    return heal(loaded, share_plan, train_data, evals, config, out=out_dir, resume=resume, on_step=on_step,
                on_phase=on_phase, control=found)


HEAL_DATA_TEXT = "heal data, held out"
OTHER_TEXT = "other text"


def heal_evals(loaded: LoadedModel, data: str | Path | None, other_text: TextSpec) -> dict[str, Any]:
    """The two held-out texts a heal is judged on: the held-out part of its training data (as many sequences as that
    part holds, up to `other_text.n_seqs`) and `other_text.text`, of another kind (`prechecks.heal_other_text`: by default the
    standard library's source code when healing on the documentation text, else the documentation)."""
    def batch(source, split_fewer: bool):
        return token_batch(loaded.tokenizer, text=source, split="heldout", n_seqs=other_text.n_seqs, seq_len=other_text.seq_len,
                           max_positions=loaded.info.max_positions, vocab_size=loaded.info.vocab_size,
                           allow_fewer=split_fewer)

    data_source = DEFAULT_TEXT if data is None else data
    return {HEAL_DATA_TEXT: batch(data_source, True), OTHER_TEXT: batch(heal_other_text(data, other_text.text), False)}


def _processes(device):
    """accelerate's view of the processes this job runs in (one, or those of `accelerate launch` / torchrun)."""
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")
