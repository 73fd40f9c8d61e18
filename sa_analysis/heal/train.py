"""The heal run: baseline and patched perplexity, training on `transformers.Trainer` with the patch in force, merge
(or gather sharded weights), healed perplexity, export."""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..artefact import provenance
from .. import parts
from ..errors import UserError
from ..io import read_json, write_json
from ..rng import seeded
from .config import FSDP_NEEDS_PROCESSES, HealConfig, check_objective
from .data import HealData
from .distill import Teacher, distill_trainer, frozen_teacher, untouched_teacher
from ..damage.heldout import Untouched, measure_heldout
from .params import FOLLOWER_UNUSED, add_lora, check_full_fits, full_parameters
from .report import HealReport

if TYPE_CHECKING:
    from ..loading import LoadedModel, ModelInfo
    from ..planner.plan import PlanLike


SETTINGS_FILE = "heal_settings.json"  # beside the Trainer's checkpoints: what they were made with



def heal(
    loaded: LoadedModel,
    plan: PlanLike,
    data: HealData,
    evals: Any,
    config: HealConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    export: bool = True,
    control: Mapping[str, Any] | None = None,
) -> HealReport | None:
    """Fine-tune `loaded.model` with Shared Attention for `plan` in force, on `transformers.Trainer`; measure,
    export, report.

    evals: held-out texts for baseline / patched / healed perplexity, {name: TokenBatch of split "heldout", or ids
    [S, T]} (one batch alone is named "held-out"); the control heal (`heal.control`) is judged on the same. out: folder for checkpoints/ (the Trainer's), healed-model/ (the export), heal_report.json and
    heal.png (None: nothing is kept). resume: continue from the newest checkpoint under out/checkpoints (a fresh start
    when there is none). on_step(step, loss) is called on the main process after each optimizer step, on_phase(name)
    as each phase starts ("before", "train", "after", "export"). Several processes (`accelerate launch`, torchrun):
    data parallel, or sharded with `config.shard="fsdp"` / `config.deepspeed`; only the main process returns the
    report. Afterwards `loaded.model` holds the healed weights (LoRA merged) with the patch in force. `control`: the
    control heal's perplexities (`heal.control.run_control`) the report is judged against (None: not measured, and
    the report says so).
    """
    from ..patch import share_attention
    from ..validate import as_plan, check_plan_for_model

    config = config or HealConfig()
    info = loaded.info
    if getattr(loaded, "share", None) is not None and loaded.share.active:
        raise UserError("This model already runs with Shared Attention (it was loaded from a shared folder); heal the base model, or call loaded.share.remove() first.")
    share_plan = as_plan(plan, info.n_layers, info.shape())
    check_plan_for_model(share_plan, info)
    check_objective(config, share_plan)
    batches = _held_out(evals)
    evals = {name: getattr(batch, "input_ids", batch) for name, batch in batches.items()}  # {name: ids [S, T]}
    if len(data) == 0:
        raise UserError(f"The data {data.source} has no usable rows.")
    model = loaded.model
    device = next(model.parameters()).device
    spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    if spread and config.sharded:
        raise UserError("A model spread over GPUs with --device-map cannot also be sharded; use one or the other.")
    keeps_checkpoints = out is not None and (config.save_every or resume)
    scratch = contextlib.nullcontext(str(Path(out) / "checkpoints")) if keeps_checkpoints else tempfile.TemporaryDirectory()
    with scratch as checkpoints:
        args = config.training_arguments(checkpoints, cpu=device.type == "cpu", bf16=_bf16(device),
                                         layer_class=type(parts.decoder_layers(model)[0]).__name__)
        main = args.process_index == 0
        phase = on_phase if main and on_phase is not None else (lambda _name: None)
        notes: list[str] = []

        # 1. before: the untouched model and the patched one on held-out text (the main process, unsharded weights)
        untouched: dict[str, Untouched] = {}
        measured: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in evals}  # text -> state -> per sequence
        phase("before")
        if main:
            for name, ids in evals.items():
                untouched[name] = Untouched.record(model, ids, config.eval_batch_size, copy_head=config.trains_head)
                measured[name]["baseline"] = measure_heldout(None, untouched[name]).per_sequence()  # as recorded
                measured[name]["patched"] = measure_heldout(model, untouched[name], share_plan, mode=config.mode).per_sequence()
        keep = copy.deepcopy(model).to("cpu") if main and config.sharded else None  # receives the gathered weights

        # 2. trainable weights (LoRA injected before the patch, so followers' v/o adapters are the ones used), patch;
        # a distillation heal's teacher: the same weights with adapters off and the patch lifted, or a frozen copy
        teacher = frozen_teacher(model) if config.objective == "distill" and config.method == "full" else None
        peft_model, memory = _make_trainable(model, share_plan.anchor_of, config, device, args.world_size)
        handle = share_attention(model, share_plan, mode=config.mode)
        if config.objective == "distill" and teacher is None:
            teacher = untouched_teacher(model, peft_model, handle)
        trained = [p for p in model.parameters() if p.requires_grad]
        if config.method == "full" and any(p.dtype in (torch.bfloat16, torch.float16) for p in trained):
            notes.append("full fine-tune of half-precision weights: small updates may round away; load float32 weights "
                         "(--dtype float32) to train with bf16 autocast instead")

        # 3. train on the Trainer (schedule, accumulation, clipping, mixed precision, DDP / FSDP / DeepSpeed, checkpoints)
        start = _resume_point(checkpoints, resume, config, share_plan, info, sum(p.numel() for p in trained), main, notes)
        phase("train")
        trainer, result = _train(peft_model or model, args, data, config, handle, start, on_step if main else None, teacher)
        run = _run_stats(trainer, result, device, start)
        run.update(n_trainable=sum(p.numel() for p in trained), full_finetune_bytes=memory)

        # 4. the healed weights, gathered (sharded) or unwrapped, LoRA merged; the patch in force again
        model = _healed_weights(trainer, keep, main, config.sharded, device)
        handle.remove()
        if not main:
            return None
        if peft_model is not None:
            model = model.merge_and_unload()
        model = model.eval()  # (a model spread with --device-map stays where accelerate placed it)
        for param in model.parameters():
            param.requires_grad_(False)
        loaded.model = model
        loaded.share = share_attention(model, share_plan, mode=config.mode)
        run["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

        # 5. after: the healed model against the untouched one on the same held-out ids; report, figure, export
        phase("after")
        for name in evals:
            measured[name]["healed"] = measure_heldout(model, untouched[name]).per_sequence()
        losses = [float(h["loss"]) for h in run.pop("log_history") if "loss" in h]
        report = HealReport(
            model=info.to_dict(), plan=share_plan.to_dict(), config=config.to_dict(), data=data.describe(),
            evals={name: evaluated(describe_batch(batch), measured[name]) for name, batch in batches.items()},
            losses=losses, run=run, notes=notes, meta=provenance(device))
        if share_plan.n_shared:
            report.judge(None if control is None else dict(control))
        if out is not None:
            _write_outputs(report, loaded, share_plan, Path(out), config.mode, export, phase)
        return report


def evaluated(text: dict[str, Any], states: Mapping[str, Mapping[str, list[float]]]) -> dict[str, Any]:
    """One held-out text's entry of the report: what the text is, and for each state of the model ("baseline":
    untouched, "patched": shared before healing, "healed") its NLL per sequence and perplexity, and how far it is from
    the untouched model: next-token KL and top-1 agreement, per sequence and mean."""
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"text": text, "nll": {k: v["nll"] for k, v in states.items()},
            "perplexity": {k: math.exp(mean(v["nll"])) for k, v in states.items()},
            "kl_per_sequence": {k: v["kl"] for k, v in states.items()},
            "kl": {k: mean(v["kl"]) for k, v in states.items()},
            "top1": {k: mean(v["top1"]) for k, v in states.items()}}


def _held_out(evals: Any) -> dict[str, Any]:
    """{name: batch} of the held-out texts (a lone batch is named "held-out"); calibration text is refused."""
    named = dict(evals) if isinstance(evals, Mapping) else {"held-out": evals}
    if not named:
        raise UserError("Heal needs at least one held-out text to evaluate on.")
    for batch in named.values():
        if hasattr(batch, "input_ids") and getattr(batch, "split", "heldout") != "heldout":  # (a tensor has .split())
            raise UserError("Heal evaluates on held-out text, never the calibration text; pass a batch with split='heldout'.")
    return named


def describe_batch(batch: Any) -> dict[str, Any]:
    """What a held-out batch is (source, split, size, token hash), or its size for bare ids."""
    if hasattr(batch, "describe"):
        return batch.describe()
    return {"n_seqs": int(batch.shape[0]), "seq_len": int(batch.shape[1])}


def _train(model: torch.nn.Module, args: Any, data: HealData, config: HealConfig, handle: Any, start: str | None,
           on_step: Callable[[int, float], None] | None, teacher: Teacher | None = None) -> tuple[Any, Any]:
    """(trainer, its train output): the Trainer on the patched model (with a `teacher`: the distillation Trainer),
    from `start` (a checkpoint) or afresh. The patch comes off if training stops with an error or an interruption."""
    from transformers import PrinterCallback, Trainer  # (imported here: the Trainer takes seconds to import)

    made = dict(model=model, args=args, train_dataset=data, data_collator=data.collate, callbacks=[_step_reporter(on_step)])
    trainer = Trainer(**made) if teacher is None else distill_trainer(teacher, config.lm_weight, **made)
    trainer.remove_callback(PrinterCallback)  # our own progress, not the Trainer's printed log dicts
    try:
        if config.shard == "fsdp" and not trainer.is_fsdp_enabled:
            raise UserError(FSDP_NEEDS_PROCESSES)
        if args.device.type == "cuda":
            for index in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(index)
        with seeded(config.seed):  # the Trainer seeds itself; the caller's random state comes back after
            return trainer, trainer.train(resume_from_checkpoint=start)
    except BaseException:
        handle.remove()
        raise


def _healed_weights(trainer: Any, keep: torch.nn.Module | None, main: bool, sharded: bool, device: torch.device):
    """The trained model on the main process (None elsewhere): sharded weights gathered into the unsharded copy
    `keep`, else the Trainer's model unwrapped. Frees the Trainer's memory (optimizer states, shards)."""
    if sharded:
        gathered = trainer.accelerator.get_state_dict(trainer.model)  # full weights on the main process
        model = _load_gathered(keep, gathered).to(device) if main else None
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.accelerator.wait_for_everyone()
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def _write_outputs(report: HealReport, loaded: LoadedModel, plan: PlanLike, out: Path, mode: str, export: bool, phase) -> None:
    """The export (with its plan), heal_report.json and heal.png under `out`; their paths go into `report.files`."""
    from ..plots import plot_heal

    if export:
        phase("export")
        report.files["model"] = str(export_healed(loaded, plan, out / "healed-model", report, mode))
    report.files["report"] = str(out / "heal_report.json")
    report.files["figure"] = str(out / "heal.png")
    report.save(out / "heal_report.json")
    plot_heal(report, out / "heal")


def _bf16(device: torch.device) -> bool:
    """bf16 autocast on a GPU that has it; float32 on the CPU."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _step_reporter(on_step: Callable[[int, float], None] | None):
    """A Trainer callback that hands each optimizer step's logged loss to `on_step(step, loss)`, and stops on a
    non-finite loss."""
    from transformers import TrainerCallback

    class StepReporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if not math.isfinite(loss):
                raise UserError(f"The training loss became {loss} at step {state.global_step}; lower --lr (now {args.learning_rate:g}).")
            if on_step is not None:
                on_step(state.global_step, float(loss))

    return StepReporter()


def _resume_point(checkpoints: str, resume: bool, config: HealConfig, plan: PlanLike, info: ModelInfo, n_trainable: int,
                  main: bool, notes: list[str]) -> str | None:
    """The newest checkpoint to resume from (None: start afresh), after checking it was made with these settings
    (the Trainer restores weights, optimizer, schedule, RNG and data position; `settings.json` is ours)."""
    from transformers.trainer_utils import get_last_checkpoint

    settings = {**config.structure(), "followers": list(plan.followers), "model": info.name, "n_trainable": n_trainable}
    path = Path(checkpoints) / SETTINGS_FILE
    last = get_last_checkpoint(checkpoints) if resume and Path(checkpoints).is_dir() else None
    if resume and last is None:
        notes.append("resume asked but no checkpoint was found; started from step 0")
    if last is not None and path.is_file():
        saved = read_json(path, "heal settings")
        differ = [k for k in settings if saved.get(k) != settings[k]]
        if differ:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {settings[k]!r}" for k in differ)
            raise UserError(f"The checkpoints in {checkpoints} were made with other settings ({details}); resume with "
                            f"the same settings, or start afresh without --resume (or in another --out).")
    if main and config.save_every:
        write_json(path, settings)
    return last


def _run_stats(trainer: Any, result: Any, device: torch.device, start: str | None) -> dict[str, Any]:
    """What the run did: steps, time, tokens (non-padding, all processes), peak memory, its log."""
    state = trainer.state
    seconds = float(result.metrics.get("train_runtime", 0.0))
    first = int(Path(start).name.split("-")[-1]) if start else 0
    steps_run = state.global_step - first
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    return {"steps": state.global_step, "steps_run": steps_run, "resumed_from": first if start else None,
            "seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and steps_run else None,
            "seconds_per_step": round(seconds / steps_run, 3) if steps_run else None,
            "world_size": trainer.args.world_size, "device": str(device),
            "mixed_precision": "bf16" if trainer.args.bf16 else "no",
            "sharding": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "none",
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss(),
            "peak_memory_kind": "cuda-allocated (this process)" if device.type == "cuda" else "process-rss (lifetime)",
            "peak_memory_bytes_per_gpu": [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
            if device.type == "cuda" else None,  # this process's, on each visible GPU (a --device-map model uses several)
            "log_history": list(state.log_history)}


def _load_gathered(model: torch.nn.Module, gathered: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The unsharded copy with the trained weights the sharded run gathered. The gathered names are the patched
    model's: everything but the followers' q/k projections (and QK norms), which sharing never runs or trains."""
    missing, unexpected = model.load_state_dict(dict(gathered), strict=False)
    stray = [k for k in missing if not any(f".{part}." in k for part in FOLLOWER_UNUSED)]
    if unexpected or stray:
        raise RuntimeError(f"Gathered weights do not fit the model: missing {stray[:3]}, unexpected {unexpected[:3]}.")
    return model


def _make_trainable(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig, device: torch.device,
                    world: int):
    """(peft wrapper or None, full fine-tune memory estimate or None): LoRA adapters injected, or the chosen weights
    of a full fine-tune marked trainable after checking they fit. Runs before the patch."""
    if config.method == "lora":
        with seeded(config.seed):  # adapter initialisation
            return add_lora(model, anchor_of, config), None
    chosen = full_parameters(model, anchor_of, config)
    memory = check_full_fits([p for _, p in chosen], device, all_params=list(model.parameters()), world=world,
                             sharded=config.sharded, fp32_states=config.sharded and _bf16(device))
    chosen_ids = {id(p) for _, p in chosen}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen_ids)
    return None, memory


def export_healed(loaded: LoadedModel, plan: PlanLike, folder: str | Path, report: HealReport | None, mode: str) -> Path:
    """Export the healed, patched model with its plan and a summary of the heal in share_plan.json."""
    from ..shared_model import export_shared

    meta = {}
    if report is not None:
        meta["heal"] = {"evals": {name: {"perplexity": e["perplexity"], **report.gaps(name)} for name, e in report.evals.items()},
                        "data": report.data.get("source"), "method": report.config.get("method"),
                        "steps": report.run.get("steps"), "control": report.control}
    return export_shared(loaded, plan, folder, mode=mode, meta=meta)


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None
