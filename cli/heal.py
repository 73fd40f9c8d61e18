"""`sa-analyze heal`: fine-tune a model with Shared Attention in force, compare perplexities, export it with its plan.

One GPU or CPU: `sa-analyze heal --plan plan.json --data alpaca.jsonl`. The GPUs of one host: one model spread
over them (`--device-map auto`, LoRA), data parallel (`accelerate launch --num_processes 2 -m cli.main heal ...`), or
a sharded full fine-tune (`... heal --full --fsdp`, or `--deepspeed ds_config.json` where DeepSpeed is installed).
Training runs on transformers' Trainer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.app import (DEFAULT_MODEL, DeviceMapOpt, DeviceOpt, ModelOpt, NSeqsOpt, OutOpt, RandomInitOpt, SeqLenOpt,
                     PlainStatus, app, console, default_out, spinner, user_errors, wrote)
from cli.tables import signed_percent
from sa_analysis import defaults

PlanOpt = Annotated[Optional[Path], typer.Option("--plan", "-p", help="A plan.json written by `sa-analyze recommend-spans`.")]
SpansOpt = Annotated[Optional[str], typer.Option("--spans", help="Instead of --plan: followers as ranges, e.g. 23-26,28-30.")]
PHASES = {"control": "control heal (unshared, same recipe)", "control done": "control done", "before": "perplexity before",
          "train": "healing", "after": "perplexity after", "export": "exporting"}
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Alpaca-style JSON/JSONL (instruction, input, output; loss on the output) or plain text / JSONL 'text' (language-model loss). Default: the calibration part of the default text.")]


@app.command("heal")
@user_errors
def heal(
    plan: PlanOpt = None,
    spans: SpansOpt = None,
    data: DataOpt = None,
    objective: Annotated[str, typer.Option("--objective", help="lm: learn the text's next tokens (Alpaca: the responses); distill: restore the model you had, KL(untouched || shared) at every position (needs no labels; its control is the untouched model).")] = "lm",
    lm_weight: Annotated[float, typer.Option("--lm-weight", min=0.0, help="With --objective distill: weight of the LM loss added to the KL (0: pure distillation).")] = 0.0,
    lora: Annotated[bool, typer.Option("--lora/--full", help="LoRA adapters (merged at export), or a full fine-tune.")] = True,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank.")] = 16,
    lora_mlp: Annotated[bool, typer.Option("--lora-mlp", help="Also adapt the MLP projections (gate/up/down).")] = False,
    train_layers: Annotated[str, typer.Option("--train-layers", help="all; from-anchor: freeze the layers below the first anchor (cheaper); from-follower: train the first follower and the layers after it.")] = "all",
    full_scope: Annotated[str, typer.Option("--full-scope", help="With --full: all weights, attention (q/k/v/o projections only), or followers-vo (the followers' value and output projections only).")] = "all",
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate. Default: 1e-3 (LoRA), 5e-5 (full).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps.")] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per micro-batch (per GPU).")] = 4,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.")] = 1,
    seq_len: SeqLenOpt = defaults.SEQ_LEN,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Save a training checkpoint every N steps under OUT/checkpoints (0: never).")] = 0,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="With --full under accelerate launch / torchrun: shard weights, gradients and optimizer states over the processes (FSDP2).")] = False,
    deepspeed: Annotated[Optional[Path], typer.Option("--deepspeed", help="A DeepSpeed config file (ZeRO-1/2/3) for the Trainer, where DeepSpeed is installed.")] = None,
    report_to: Annotated[str, typer.Option("--report-to", help="Where the Trainer logs: none, tensorboard or wandb (when installed).")] = "none",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint under OUT/checkpoints.")] = False,
    mode: Annotated[str, typer.Option("--mode", help="Shared Attention mode: fast, exact or infer.")] = "fast",
    seed: Annotated[int, typer.Option("--seed", help="Data order and adapter initialisation.")] = 0,
    control: Annotated[bool, typer.Option("--control/--no-control", help="Judge the heal against a control: the unshared model fine-tuned with the same data, steps, adapters and seed (cached per model and recipe). --no-control skips it, and then recovery is not measured.")] = True,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Weights' dtype. Default: float32 on CPU; on GPU bfloat16 for LoRA, float32 master weights (bf16 autocast) for --full.")] = None,
    random_init: RandomInitOpt = False,
    text: Annotated[Optional[Path], typer.Option("--text", help="The second held-out text the heal is judged on, of another kind than --data: a plain-text or JSONL file, python-source or pydoc_data.topics. Default: python-source (the standard library's code) when healing on the default text, else the default text.")] = None,
    n_seqs: NSeqsOpt = defaults.HEAL_N_SEQS,
    out: OutOpt = None,
) -> None:
    """Heal a shared model: fine-tune with Shared Attention in force (gradients reach the anchors through the reused
    attention), then report held-out perplexity of baseline, patched and healed, and export the healed model with its
    plan (load it with `--model OUT/healed-model` or `sa_analysis.load_shared`).

    Judged on two held-out texts: the held-out part of --data ("heal data, held out"; the default data is the
    calibration part of CPython's documentation) and --text, a text of another kind ("other text"; default: the
    Python standard library's source code, `python-source`). Recovery is measured against the control, never against
    the untouched model (which would count what the fine-tune teaches about the text as recovery). Writes heal_report.json, heal.png,
    healed-model/ and (with --save-every) checkpoints/ under --out. Several GPUs of one host: --device-map auto
    (one process, LoRA), or `accelerate launch --num_processes N -m cli.main heal ...` (one process per GPU, data
    parallel; with --full --fsdp, sharded).
    """
    from sa_analysis.prechecks import check_before_loading, check_data_file, check_heal_objective, heal_other_text

    # mistakes that need no model are answered before torch is imported
    check_heal_objective(objective, lm_weight)
    check_before_loading(model, out=default_out(out, model), text=text, seq_len=seq_len, spans=spans, plan_file=plan)
    check_data_file(data)
    heal_other_text(data, text)
    from sa_analysis.pipeline import HealConfig, ModelSpec, TextSpec, run_heal

    method = "lora" if lora else "full"
    config = HealConfig(method=method, objective=objective, lm_weight=lm_weight, lora_rank=lora_rank, lora_mlp=lora_mlp, train_layers=train_layers,
                        full_scope=full_scope, lr=lr, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                        seq_len=seq_len, save_every=save_every, mode=mode, seed=seed, shard="fsdp" if fsdp else "none",
                        deepspeed=str(deepspeed) if deepspeed else None, report_to=report_to)
    bar: dict = {}  # the progress bar, made once the main process starts training

    def starting(start) -> None:
        if not start.main:
            return
        d = start.data
        console.print(f"[bold]Healing[/] {start.model} with {start.plan.summary()}", highlight=False)
        console.print(f"  {objective} objective{f' + {lm_weight:g} x LM' if lm_weight else ''}, {method}"
                      f"{f' rank {lora_rank}' if method == 'lora' else ''}, {steps} steps x {batch_size} x "
                      f"{grad_accum} x {start.processes} process(es), lr {config.learning_rate:g}, {start.dtype} on "
                      f"{start.device}{' with bf16 autocast' if start.mixed_precision == 'bf16' else ''}; data: "
                      f"{d['source']} ({d['kind']}, {d['n_examples']} examples{_skipped(d)})", highlight=False)
        texts = "; ".join(f"{name}: {e['source']} ({e['n_seqs']} x {e['seq_len']})" for name, e in start.evals.items())
        console.print(f"  judged on {texts}; control: {start.control}", highlight=False)
        if not console.is_terminal:  # piped: plain lines, each phase and every tenth of the steps
            bar["plain"] = PlainStatus("healing")
            return
        bar["progress"] = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("steps"), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                   TimeRemainingColumn(), console=console)
        bar["task"] = bar["progress"].add_task("starting", total=steps, loss="-")
        bar["progress"].start()

    def update(**fields) -> None:
        if "description" in fields:  # a phase starts (the control's training, then the heal's): its own clock
            bar["phase_started"] = time.perf_counter()
        if "progress" in bar:
            bar["progress"].update(bar["task"], **fields)
        elif "plain" in bar and ("description" in fields or fields["completed"] % max(1, steps // 10) == 0):
            done = ""
            if "completed" in fields:
                step, spent = fields["completed"], time.perf_counter() - bar.get("phase_started", time.perf_counter())
                done = f"step {step}/{steps}, loss {fields['loss']}, about {spent / step * (steps - step):.0f} s left"
            bar["plain"].update(fields.get("description") or done)

    try:
        report = run_heal(
            ModelSpec(model, device, dtype, random_init, device_map), TextSpec(text, n_seqs, seq_len), config, plan_file=plan,
            spans=spans, data=data, out=default_out(out, model), resume=resume, status=spinner, on_start=starting,
            on_step=lambda step, loss: update(completed=step, loss=f"{loss:.4f}"),
            on_phase=lambda phase: update(description=PHASES.get(phase, phase)), control=control)
    finally:
        if "progress" in bar:
            bar["progress"].stop()
    if report is None:  # not the main process
        return
    for note in report.notes:
        console.print(f"[yellow]Note:[/] {note}", highlight=False)
    print_report(report)
    console.print(f"Load the healed model with [cyan]--model {report.files['model']}[/] or "
                  f"[cyan]sa_analysis.load_shared({report.files['model']!r})[/].", highlight=False)
    wrote([report.files["report"], report.files["figure"], report.files["model"]])


def print_report(report) -> None:
    """Per held-out text, the three yardsticks: perplexity against the untouched model (before and after healing),
    against the control, and faithfulness (KL to the untouched model, top-1 agreement); then the run's numbers."""
    from sa_analysis.pipeline import YARDSTICKS
    table = Table(title=f"Held-out: what sharing costs, before and after a {report.objective} heal", title_justify="left")
    distill = report.objective == "distill"
    columns = ["held-out text", "untouched", *([] if distill else ["control"]), "shared", "healed",
               "vs untouched: before", "vs untouched: after", *([] if distill else ["vs control: after", "closed"]),
               "KL: before -> after", "top-1: before -> after"]
    for column in columns:
        table.add_column(column, justify="left" if column == "held-out text" else "right")
    for name, evaluated in report.evals.items():
        p, g, text = evaluated["perplexity"], report.gaps(name), evaluated.get("text") or {}
        closed = "not measured" if g["after"] is None else "n/a" if g["closed"] is None else f"{100 * g['closed']:.0f}%"
        control = [] if distill else [f"{p['control']:.4g}" if "control" in p else "-"]
        against = [] if distill else [signed_percent(g, "after"), closed]
        table.add_row(f"{name}: {text.get('source', '?')} ({text.get('n_seqs', '?')} x {text.get('seq_len', '?')})",
                      f"{p['baseline']:.4g}", *control, f"{p['patched']:.4g}", f"{p['healed']:.4g}",
                      signed_percent(g, "before"), signed_percent(g, "after_untouched"), *against,
                      _arrow(g["kl_before"], g["kl_after"], "{:.3f}"), _arrow(g["top1_before"], g["top1_after"], "{:.0%}"))
    console.print(table)
    closed = "" if distill else "; closed = 1 - gap after / gap before against the control (in nats)"
    console.print(f"{YARDSTICKS}. Gaps: perplexity ratio - 1 [95 % interval over sequences, paired]{closed}.",
                  highlight=False)
    run = report.run
    resumed = f", resumed at step {run['resumed_from']}" if run.get("resumed_from") is not None else ""
    losses = report.losses
    loss = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no steps run"
    speed = f", {run['tokens_per_s']:,.0f} tokens/s" if run.get("tokens_per_s") else ""
    control = report.control or {}
    said = {"run": f"control healed in {control.get('seconds', 0):.0f} s", "cached": "control from the cache",
            "untouched": "control: the untouched model (distillation)",
            "skipped": "no control (--no-control): recovery under the same fine-tune is not measured"}.get(control.get("status"), "")
    console.print(f"[bold]{report.summary()}[/]", highlight=False)
    trainable = f", {run['n_trainable']:,} trainable parameters" if run.get("n_trainable") else ""
    console.print(f"{run['steps_run']} steps in {run['seconds']:.0f} s{speed}{resumed}{trainable}; {loss}; {said}.",
                  highlight=False)


def _arrow(before, after, form: str) -> str:
    """'before -> after' in `form`, '-' where not measured."""
    if before is None or after is None:
        return "-"
    return f"{form.format(before)} -> {form.format(after)}"


def _skipped(described: dict) -> str:
    skipped = sum((described.get("skipped") or {}).values())
    return f", {skipped} rows skipped" if skipped else ""
