"""`sa-analyze validate`: prove a Shared Attention plan, baseline vs patched on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import (
    DEFAULT_MODEL, DEFAULT_N_SEQS, DEFAULT_SEQ_LEN, DeviceMapOpt, DeviceOpt, DtypeOpt, ModelOpt, NSeqsOpt, OutOpt,
    RandomInitOpt, SeqLenOpt, TextOpt, app, console, default_out, spinner, user_errors, wrote,
)
from sa_analysis import defaults

PlanOpt = Annotated[Optional[Path], typer.Option("--plan", "-p", help="A plan.json written by `sa-analyze recommend-spans`.")]
SpansOpt = Annotated[Optional[str], typer.Option("--spans", help="Instead of --plan: followers as ranges, e.g. 23-26,28-30 (each span reuses the layer before it).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="fast (SDPA on the anchor's Q and K), exact (the anchor's materialised fp32 softmax) or infer (fast prefill; at each decode step followers reuse the anchor's softmax row and read no keys).")]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", min=0.0, help="Largest relative perplexity increase that passes (0.05 = +5%).")]
TasksOpt = Annotated[Optional[str], typer.Option("--tasks", help="Tasks, comma-separated: passkey (retrieval of a key hidden at several depths, at lengths up to the model's context, or up to N with passkey@N; built in), or lm-evaluation-harness names (sa_tiny_mc ships with sa-analysis) and task YAML paths (these need `pip install lm-eval`).")]
TaskLimitOpt = Annotated[Optional[int], typer.Option("--task-limit", min=1, help="At most this many examples per task.")]
NoSpeedOpt = Annotated[bool, typer.Option("--no-speed", help="Skip the prefill/decode throughput and memory measurements.")]
DecodeOpt = Annotated[int, typer.Option("--decode-tokens", min=0, help="Tokens decoded per sequence when measuring decode speed.")]

FAILED_EXIT_CODE = 3  # the plan ran but lost more quality than --tolerance allows


@app.command("validate")
@user_errors
def validate(
    plan: PlanOpt = None,
    spans: SpansOpt = None,
    mode: ModeOpt = "fast",
    tolerance: ToleranceOpt = defaults.TOLERANCE,
    tasks: TasksOpt = None,
    task_limit: TaskLimitOpt = None,
    no_speed: NoSpeedOpt = False,
    decode_tokens: DecodeOpt = defaults.DECODE_TOKENS,
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    random_init: RandomInitOpt = False,
    device_map: DeviceMapOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: SeqLenOpt = DEFAULT_SEQ_LEN,
    out: OutOpt = None,
) -> None:
    """Run the model with and without a Shared Attention plan on held-out text: perplexity, next-token KL, top-1
    agreement, pass/fail against --tolerance, measured throughput and KV-cache bytes. Writes validation.json.

    Exit code 0 when the plan passes, 3 when it fails the tolerance (1 is kept for user mistakes)."""
    from cli.tables import print_validation
    from sa_analysis.prechecks import check_before_loading

    # mistakes that need no model are answered before torch is imported
    check_before_loading(model, out=default_out(out, model), text=text, seq_len=seq_len, spans=spans, plan_file=plan)
    from sa_analysis.pipeline import ModelSpec, TextSpec, run_validate

    def starting(share_plan, batch) -> None:
        console.print(f"[bold]Validating[/] {share_plan.summary()} on {batch.n_seqs} x {batch.seq_len} held-out tokens "
                      f"({mode} mode)", highlight=False)

    report, path = run_validate(
        ModelSpec(model, device, dtype, random_init, device_map), TextSpec(text, n_seqs, seq_len), plan_file=plan,
        spans=spans, mode=mode, tolerance=tolerance, tasks=split_tasks(tasks), task_limit=task_limit,
        measure_speed=not no_speed, decode_tokens=decode_tokens, out=out, status=spinner, on_start=starting)
    print_validation(report)
    wrote([path])
    if not report.passed:
        raise typer.Exit(code=FAILED_EXIT_CODE)


def split_tasks(tasks: Optional[str]) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]
