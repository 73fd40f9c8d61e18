"""Rich tables the commands share: a validation report and a plan search (printing only; the library computes)."""

from __future__ import annotations

from typing import Optional

from rich.table import Table

from cli.app import console, format_bytes


def print_validation(report) -> None:
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
    for note in report.meta.get("notes", []):
        console.print(f"[yellow]Note:[/] {note}", highlight=False)
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
    table = Table(title="Downstream tasks", title_justify="left")
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


def print_search(search) -> None:
    """The candidates tried (calibration text), least KL first within each layer count, and the choice."""
    table = Table(title=f"Plans measured on calibration text (tolerance {100 * search.tolerance:g}% perplexity)",
                  title_justify="left")
    for column in ("layers", "spans", "heads", "proposed by", "planner cost", "perplexity change", "next-token KL", "pass"):
        table.add_column(column, justify="left" if column in ("spans", "heads", "proposed by", "pass") else "right",
                         overflow="fold")
    candidates = sorted((r for r in search.rows if r["stage"] == "candidate"), key=lambda r: (r["n_shared"], r["kl_mean"]))
    for r in candidates:
        cost = r.get("predicted_cost")
        aligned = r.get("aligned") or []
        heads = "index" if not aligned else "aligned" if len(aligned) == r["n_shared"] else "aligned " + ",".join(map(str, aligned))
        table.add_row(str(r["n_shared"]), r["spans"], heads, ", ".join(r.get("methods", [r["method"]])),
                      "-" if cost is None else f"{cost:.4g}", f"{100 * r['ppl_change']:+.2f}%", f"{r['kl_mean']:.4g}",
                      "yes" if r["passed"] else "no")
    console.print(table)
    singles = sorted(search.sensitivity.items(), key=lambda kv: kv[1])
    if singles:
        easy = ", ".join(f"{m} ({v:.3g})" for m, v in singles[:5])
        hard = ", ".join(f"{m} ({v:.3g})" for m, v in singles[-3:])
        console.print(f"Measured sensitivity (next-token KL when shared alone, the better of index and head-aligned): "
                      f"least {easy}; most {hard}", highlight=False)
    aligned = search.meta.get("aligned_layers")
    if aligned is not None:
        console.print(f"Head maps kept where they measured better than index sharing (alone): "
                      f"{', '.join(map(str, aligned)) or 'none'}", highlight=False)
    best = search.best_plan
    if best is None:
        console.print("[bold red]No plan tried stays within the tolerance;[/] raise --tolerance or share fewer layers.")
    else:
        console.print(f"[bold]Best within tolerance:[/] {best.summary()} (spans {best.spans_spec()})", highlight=False)
