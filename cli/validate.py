"""`sa-analyze validate`: prove a Shared Attention plan, baseline vs patched on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cli.app import (
    DEFAULT_MODEL, DEFAULT_N_SEQS, DEFAULT_SEQ_LEN, DeviceMapOpt, DeviceOpt, DtypeOpt, ModelOpt, NSeqsOpt, OutOpt,
    RandomInitOpt, SeqLenOpt, TextOpt, app, console, default_out, format_bytes, user_errors, wrote,
)
from sa_analysis.errors import UserError

PlanOpt = Annotated[Optional[Path], typer.Option("--plan", "-p", help="A plan.json written by `sa-analyze recommend-spans`.")]
SpansOpt = Annotated[Optional[str], typer.Option("--spans", help="Instead of --plan: followers as ranges, e.g. 23-26,28-30 (each span reuses the layer before it).")]
ModeOpt = Annotated[str, typer.Option("--mode", help="fast (SDPA on the anchor's Q and K) or exact (the anchor's materialised fp32 softmax).")]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", min=0.0, help="Largest relative perplexity increase that passes (0.05 = +5%).")]
TasksOpt = Annotated[Optional[str], typer.Option("--tasks", help="lm-evaluation-harness tasks, comma-separated: names (sa_tiny_mc ships with sa-analysis) or task YAML paths. Needs `pip install lm-eval`.")]
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
    tolerance: ToleranceOpt = 0.05,
    tasks: TasksOpt = None,
    task_limit: TaskLimitOpt = None,
    no_speed: NoSpeedOpt = False,
    decode_tokens: DecodeOpt = 32,
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
    from sa_analysis.data import load_documents, token_batch
    from sa_analysis.io import ensure_writable_dir
    from sa_analysis.loading import load_model
    from sa_analysis.patch import MODES
    from sa_analysis.validate import validate_plan

    if plan is not None and spans is not None:
        raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
    if mode not in MODES:
        raise UserError(f"Unknown --mode {mode!r}; use fast or exact.")
    task_list = _split_tasks(tasks)
    if task_list:
        from sa_analysis.validate import check_tasks

        with console.status("[bold]indexing lm-eval tasks[/]"):
            check_tasks(task_list)
    share_plan = _load_plan_file(plan) if plan is not None else None
    out_dir = ensure_writable_dir(default_out(out, model))
    load_documents(text)  # a missing text file fails before the model loads
    with console.status(f"[bold]loading {model}[/]"):
        loaded = load_model(model, device=device, dtype=dtype, random_init=random_init, device_map=device_map)
    saved = loaded.info.extra.get("shared", {}).get("plan")  # a folder exported by `heal` carries its plan
    loaded.without_sharing()  # the baseline is the same weights without sharing
    if share_plan is None and spans is None:
        if saved is None:
            raise UserError("Give exactly one of --plan PLAN.json or --spans 23-26,28-30.")
        from sa_analysis.planner import SharePlan

        share_plan = SharePlan.from_dict(saved)
        share_plan.model["name"] = loaded.info.name  # the folder's own plan: it was exported with these weights
    share_plan = _plan_for(loaded.info, share_plan, spans)
    batch = token_batch(loaded.tokenizer, text=text, split="heldout", n_seqs=n_seqs, seq_len=seq_len,
                        max_positions=loaded.info.max_positions, vocab_size=loaded.info.vocab_size)
    console.print(f"[bold]Validating[/] {share_plan.summary()} on {batch.n_seqs} x {batch.seq_len} held-out tokens ({mode} mode)", highlight=False)
    with console.status("[bold]measuring baseline and patched[/]"):
        report = validate_plan(loaded, share_plan, batch, mode=mode, tolerance=tolerance, tasks=task_list,
                               task_limit=task_limit, measure_speed=not no_speed, speed_new_tokens=decode_tokens)
    print_report(report)
    path = report.save(out_dir / "validation.json")
    wrote([path])
    if not report.passed:
        raise typer.Exit(code=FAILED_EXIT_CODE)


def _split_tasks(tasks: Optional[str]) -> list[str]:
    return [t.strip() for t in (tasks or "").split(",") if t.strip()]


def _load_plan_file(path: Path):
    from sa_analysis.planner import SharePlan

    return SharePlan.load(path)


def _plan_for(info: Any, plan: Any, spans: Optional[str]):
    """The plan to validate, checked against the loaded model (layers, shape, name)."""
    from sa_analysis.planner import SharePlan
    from sa_analysis.validate import check_plan_for_model

    if plan is None:
        return SharePlan.from_spans(spans, info.n_layers, model=info.shape())
    check_plan_for_model(plan, info)
    return plan


# ----- printing ----------------------------------------------------------------------------------------------
def print_report(report) -> None:
    """Rich tables: quality (baseline, patched, change), speed and memory, tasks; then the verdict."""
    q = report.quality
    table = Table(title="Quality on held-out text", title_justify="left")
    for column in ("", "baseline", "patched", "change"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("perplexity", f"{q['ppl_baseline']:.4g}", f"{q['ppl_patched']:.4g}", f"{100 * q['ppl_change']:+.2f}%")
    table.add_row("next-token KL (nats)", "", f"{q['kl_mean']:.4g}", "")
    table.add_row("top-1 agreement", "", f"{100 * q['top1_agreement']:.1f}%", "")
    console.print(table)
    if report.speed:
        _print_speed(report.speed, report.predicted)
    if report.tasks:
        _print_tasks(report.tasks)
    colour = "green" if report.passed else "red"
    console.print(f"[bold {colour}]{report.summary()}[/]", highlight=False)


def _print_speed(speed: dict, predicted: Optional[dict]) -> None:
    base, patched, ratio = speed["baseline"], speed["patched"], speed["ratio"]
    table = Table(title=f"Speed and memory (batch {base['batch']}, {base['prompt_len']}-token prompt, "
                        f"{base['n_new']} decoded tokens, {base['timer']})", title_justify="left")
    for column in ("", "baseline", "patched", "patched / baseline", "predicted"):
        table.add_column(column, justify="right" if column else "left")
    kv_pred = None if not predicted else 1 - predicted.get("kv_cache_fraction_saved", 0)
    rows = [("prefill tokens/s", "prefill_tokens_per_s", _num, None),
            ("decode tokens/s", "decode_tokens_per_s", _num, None),
            ("KV-cache bytes", "kv_cache_bytes", _bytes, kv_pred),
            ("K-cache bytes", "k_cache_bytes", _bytes, None),
            ("peak memory", "peak_memory_bytes", _bytes, None)]
    for label, key, fmt, pred in rows:
        r = ratio.get(key)
        table.add_row(label, fmt(base.get(key)), fmt(patched.get(key)), "" if r is None else f"{r:.3f}",
                      "" if pred is None else f"{pred:.3f}")
    console.print(table)
    if speed.get("peak_memory_note"):
        console.print(f"  ({speed['peak_memory_note']})", highlight=False)


def _print_tasks(tasks: dict) -> None:
    table = Table(title="Downstream tasks (lm-evaluation-harness)", title_justify="left")
    for column in ("task", "metric", "baseline", "patched", "change"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in tasks["baseline"].items():
        for metric, value in metrics.items():
            if metric == "sample_len":
                continue
            after = tasks["patched"].get(task, {}).get(metric)
            table.add_row(task, metric, f"{value:.4f}", _num(after, ".4f"), _num(tasks["change"][task].get(metric), "+.4f"))
    console.print(table)


def _num(value: Optional[float], spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _bytes(value) -> str:
    return format_bytes(value, missing="-")


# ----- the validate loop, for `recommend-spans --validate` -------------------------------------------------------
def run_search(att: Any, *, model: str, out_dir: Path, max_budget: int, tolerance: float = 0.05, mode: str = "fast",
               cost: str = "kl", first_shareable: int = 1, keep: tuple[int, ...] | list[int] = (),
               max_span: Optional[int] = None, device: Optional[str] = None, dtype: Optional[str] = None,
               random_init: bool = False, device_map: Optional[str] = None, text: Optional[Path] = None,
               n_seqs: int = DEFAULT_N_SEQS, seq_len: int = DEFAULT_SEQ_LEN) -> list[Path]:
    """Plan -> measure -> re-plan on the calibration text, then check the best plan on held-out text.

    Tries budgets 1..`max_budget` (stopping at the first with nothing within `tolerance`), prints the table of what
    was tried, and writes search.json, search.png, plan_validated.json and validation.json; returns their paths.
    """
    from sa_analysis.data import token_batch
    from sa_analysis.loading import load_model
    from sa_analysis.plots import plot_search
    from sa_analysis.validate import search_plans

    if max_budget < 1:
        raise UserError("--validate needs a plan that shares at least one layer; raise --budget or --max-cost.")
    with console.status(f"[bold]loading {model}[/]"):
        loaded = load_model(model, device=device, dtype=dtype, random_init=random_init, device_map=device_map)
    batches = {split: token_batch(loaded.tokenizer, text=text, split=split, n_seqs=n_seqs, seq_len=seq_len,
                                  max_positions=loaded.info.max_positions, vocab_size=loaded.info.vocab_size)
               for split in ("calibration", "heldout")}
    with console.status("[bold]measuring plans[/]") as status:
        search = search_plans(loaded, att, batches["calibration"], batches["heldout"], budgets=range(1, max_budget + 1),
                              tolerance=tolerance, mode=mode, cost=cost, first_shareable=first_shareable, keep=keep,
                              max_span=max_span, progress=lambda msg: status.update(f"[bold]{msg}[/]"))
    print_search(search)
    paths = [search.save(out_dir / "search.json"), plot_search(search, out_dir / "search.png")]
    if search.best_plan is not None:
        paths.append(search.best_plan.save(out_dir / "plan_validated.json"))
        paths.append(search.validation.save(out_dir / "validation.json"))
        print_report(search.validation)
    return paths


def print_search(search) -> None:
    """The candidates tried (calibration text), least KL first within each layer count, and the choice."""
    table = Table(title=f"Plans measured on calibration text (tolerance {100 * search.tolerance:g}% perplexity)",
                  title_justify="left")
    for column in ("layers", "spans", "proposed by", "planner cost", "perplexity change", "next-token KL", "pass"):
        table.add_column(column, justify="left" if column in ("spans", "proposed by", "pass") else "right",
                         overflow="fold")
    candidates = sorted((r for r in search.rows if r["stage"] == "candidate"), key=lambda r: (r["n_shared"], r["kl_mean"]))
    for r in candidates:
        cost = r.get("predicted_cost")
        table.add_row(str(r["n_shared"]), r["spans"], ", ".join(r.get("methods", [r["method"]])),
                      "-" if cost is None else f"{cost:.4g}", f"{100 * r['ppl_change']:+.2f}%", f"{r['kl_mean']:.4g}",
                      "yes" if r["passed"] else "no")
    console.print(table)
    singles = sorted(search.sensitivity.items(), key=lambda kv: kv[1])
    if singles:
        easy = ", ".join(f"{m} ({v:.3g})" for m, v in singles[:5])
        hard = ", ".join(f"{m} ({v:.3g})" for m, v in singles[-3:])
        console.print(f"Measured sensitivity (next-token KL when shared alone): least {easy}; most {hard}", highlight=False)
    best = search.best_plan
    if best is None:
        console.print("[bold red]No plan tried stays within the tolerance;[/] raise --tolerance or share fewer layers.")
    else:
        console.print(f"[bold]Best within tolerance:[/] {best.summary()} (spans {best.spans_spec()})", highlight=False)
