"""The heal run: baseline and patched perplexity, training with the patch in force, merge, healed perplexity, export."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..artefact import provenance
from ..errors import UserError
from ..rng import seeded
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import HealConfig
from .data import HealData
from .evaluate import perplexity, recovered_fraction
from .params import add_lora, check_full_fits, full_parameters
from .report import HealReport



def make_accelerator(device: torch.device | None = None):
    """An `accelerate.Accelerator` for healing: bf16 autocast on a GPU that has it, none on the CPU; the model is
    placed by us (on its loading device, or the process's GPU under `accelerate launch`)."""
    from accelerate import Accelerator

    cpu = device is not None and device.type == "cpu"
    bf16 = not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no", device_placement=False)


def heal(
    loaded: Any,
    plan: Any,
    data: HealData,
    eval_batch: Any,
    config: HealConfig | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    accelerator: Any = None,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    export: bool = True,
) -> HealReport:
    """Fine-tune `loaded.model` with Shared Attention for `plan` in force; measure, export, report.

    eval_batch: held-out token ids (a TokenBatch of split "heldout", or [S, T]) for baseline/patched/healed
    perplexity. out: folder for checkpoints/, model/ (the export), heal_report.json and heal.png (None: nothing is
    written). resume: continue from the newest checkpoint under out/checkpoints (a fresh start when there is none).
    on_step(step, loss) is called on the main process after each optimizer step, on_phase(name) as each phase starts
    ("before", "train", "after", "export"). Afterwards `loaded.model` holds
    the healed weights (LoRA merged) with the patch in force, `loaded.share` its handle.
    """
    from ..patch import share_attention
    from ..validate import as_plan, check_plan_for_model

    config = config or HealConfig()
    info = loaded.info
    if getattr(loaded, "share", None) is not None and loaded.share.active:
        raise UserError("This model already runs with Shared Attention (it was loaded from a shared folder); heal the base model, or call loaded.share.remove() first.")
    share_plan = as_plan(plan, info.n_layers, info.shape())
    check_plan_for_model(share_plan, info)
    anchor_of = share_plan.anchor_of
    ids_eval = eval_batch.input_ids if hasattr(eval_batch, "input_ids") else eval_batch
    if hasattr(eval_batch, "input_ids") and getattr(eval_batch, "split", "heldout") != "heldout":  # (a tensor has .split())
        raise UserError("Heal evaluates on held-out text, never the calibration text; pass a batch with split='heldout'.")
    if len(data) == 0:
        raise UserError(f"The data {data.source} has no usable rows.")
    model = loaded.model
    device = next(model.parameters()).device
    acc = accelerator or make_accelerator(device)
    main = acc.is_main_process
    _check_distributed(acc)
    out = Path(out) if out is not None else None
    notes: list[str] = []
    phase = (on_phase if main and on_phase is not None else (lambda _name: None))

    # 1. before: baseline and patched perplexity on held-out text
    ppl: dict[str, float] = {}
    phase("before")
    if main:
        ppl["baseline"] = perplexity(model, ids_eval, config.eval_batch_size)
        with share_attention(model, share_plan, mode=config.mode):
            ppl["patched"] = perplexity(model, ids_eval, config.eval_batch_size)

    # 2. trainable weights (LoRA injected before the patch, so followers' v/o adapters are the ones used), patch
    peft_model, memory = _make_trainable(model, anchor_of, config, device)
    handle = share_attention(model, share_plan, mode=config.mode)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.method == "full" and any(p.dtype in (torch.bfloat16, torch.float16) for _, p in named):
        notes.append("full fine-tune of half-precision weights: small updates may round away; load float32 weights "
                     "(--dtype float32) to train with bf16 autocast instead")
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.learning_rate, weight_decay=config.weight_decay)
    train_model, optimizer = acc.prepare(model, optimizer)

    # 3. resume from the newest checkpoint
    n_trainable = sum(p.numel() for _, p in named)
    fingerprint = {**config.structure(), "followers": list(share_plan.followers), "model": info.name, "n_trainable": n_trainable}
    checkpoints = out / "checkpoints" if out is not None else None
    start, losses = 0, []
    if resume:
        last = latest_checkpoint(checkpoints) if checkpoints is not None else None
        if last is None:
            notes.append("resume asked but no checkpoint was found; started from step 0")
        else:
            start, losses = load_checkpoint(last, named, optimizer, fingerprint)
            losses = losses[:start]

    # 4. train
    phase("train")
    with seeded(config.seed):  # the loop re-seeds per step for dropout; the caller's random state comes back after
        run = _train_loop(train_model, optimizer, named, data, config, acc, start, losses, checkpoints, fingerprint,
                          on_step if main else None)
    run.update(resumed_from=start if resume and start else None, device=str(device), n_trainable=n_trainable,
               mixed_precision=str(acc.mixed_precision))
    if memory is not None:
        run["full_finetune_bytes"] = memory

    # 5. lift the patch, merge LoRA, patch again: the healed model is exactly what is exported
    acc.wait_for_everyone()
    model = acc.unwrap_model(train_model, keep_fp32_wrapper=False)
    handle.remove()
    if peft_model is not None:
        model = peft_model.merge_and_unload()
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    loaded.model = model
    loaded.share = share_attention(model, share_plan, mode=config.mode)
    run["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

    # 6. after: healed perplexity, report, figure, export (main process)
    report = None
    if main:
        phase("after")
        ppl["healed"] = perplexity(model, ids_eval, config.eval_batch_size)
        described = eval_batch.describe() if hasattr(eval_batch, "describe") else {"n_seqs": int(ids_eval.shape[0]), "seq_len": int(ids_eval.shape[1])}
        report = HealReport(
            model=info.to_dict(), plan=share_plan.to_dict(), config=config.to_dict(), data=data.describe(), eval=described,
            perplexity=ppl, recovered=recovered_fraction(ppl["baseline"], ppl["patched"], ppl["healed"]), losses=losses,
            run=run, notes=notes, meta=provenance(device))
        if out is not None:
            if export:
                phase("export")
                report.files["model"] = str(export_healed(loaded, share_plan, out / "healed-model", report, config.mode))
            report.files["report"] = str(out / "heal_report.json")
            report.files["figure"] = str(out / "heal.png")
            report.save(out / "heal_report.json")
            from ..plots import plot_heal

            plot_heal(report, out / "heal")
    acc.wait_for_everyone()
    return report


def _make_trainable(model: torch.nn.Module, anchor_of: Mapping[int, int], config: HealConfig, device: torch.device):
    """(peft wrapper or None, full fine-tune memory estimate or None): LoRA adapters injected, or the chosen weights
    of a full fine-tune marked trainable after checking they fit. Runs before the patch."""
    if config.method == "lora":
        with seeded(config.seed):  # adapter initialisation
            return add_lora(model, anchor_of, config), None
    chosen = full_parameters(model, anchor_of, config)
    memory = check_full_fits([p for _, p in chosen], device)
    chosen_ids = {id(p) for _, p in chosen}
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen_ids)
    return None, memory


def _train_loop(train_model, optimizer, named, data: HealData, config: HealConfig, acc, start: int, losses: list[float],
                checkpoints: Path | None, fingerprint: Mapping[str, Any], on_step) -> dict[str, Any]:
    """Optimizer steps `start`..`config.steps` (appending to `losses`), checkpointing every `save_every`; run stats."""
    device = next(p for _, p in named).device
    world, rank = acc.num_processes, acc.process_index
    params = [p for _, p in named]
    tokens = torch.zeros((), dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(start, config.steps):
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout (if any) repeats on resume
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            batch = data.batch(data.indices(step, micro, config.batch_size, config.grad_accum, rank, world, config.seed))
            batch = {k: v.to(device) for k, v in batch.items()}
            last_micro = micro == config.grad_accum - 1
            with contextlib.nullcontext() if last_micro else acc.no_sync(train_model):  # all-reduce once per step
                loss = train_model(**batch, use_cache=False).loss
                acc.backward(loss / config.grad_accum)
            step_loss += loss.detach().float() / config.grad_accum
            tokens += batch["attention_mask"].sum()
        if config.max_grad_norm:
            acc.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(acc.reduce(step_loss, reduction="mean"))
        if not math.isfinite(value):
            raise UserError(f"The training loss became {value} at step {step + 1}; lower --lr (now {config.learning_rate:g}).")
        losses.append(value)
        if on_step is not None:
            on_step(step + 1, value)
        done = step + 1
        if checkpoints is not None and config.save_every and done % config.save_every == 0 and done < config.steps:
            if acc.is_main_process:
                save_checkpoint(checkpoints, done, named, optimizer, losses, fingerprint, config.keep_checkpoints)
            acc.wait_for_everyone()
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    tokens_all = int(acc.reduce(tokens, reduction="sum"))
    steps_run = config.steps - start
    return {"steps": config.steps, "steps_run": steps_run, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu_seconds, 2),  # this process's CPU time, all threads (on a shared CPU: load-independent)
            "tokens": tokens_all, "tokens_per_s": round(tokens_all / seconds, 1) if seconds > 0 and steps_run else None,
            "seconds_per_step": round(seconds / steps_run, 3) if steps_run else None, "world_size": world,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss(),
            "peak_memory_kind": "cuda-allocated" if device.type == "cuda" else "process-rss (lifetime)"}


def _check_distributed(acc: Any) -> None:
    """Plain DDP (and DeepSpeed ZeRO-1/2) keep whole weights on every process; ZeRO-3 and FSDP shard them, which the
    patch (it moves modules) and the export (it saves the unwrapped model) do not support."""
    kind = str(getattr(acc, "distributed_type", "")).rsplit(".", 1)[-1]
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if kind == "FSDP" or (kind == "DEEPSPEED" and stage == 3):
        raise UserError("Healing supports data parallelism (DDP, or DeepSpeed ZeRO stage 1/2), not sharded weights "
                        "(FSDP, ZeRO-3); pick another accelerate config, or heal with LoRA on one GPU.")


def export_healed(loaded: Any, plan: Any, folder: str | Path, report: HealReport | None, mode: str) -> Path:
    """Export the healed, patched model with its plan and a summary of the heal in share_plan.json."""
    from ..shared_model import export_shared

    meta = {}
    if report is not None:
        meta["heal"] = {"perplexity": report.perplexity, "recovered": report.recovered, "data": report.data.get("source"),
                        "method": report.config.get("method"), "steps": report.run.get("steps")}
    return export_shared(loaded, plan, folder, mode=mode, meta=meta)


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None
