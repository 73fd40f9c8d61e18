"""Rich tables the commands share: a validation report and a plan search (printing only; the library computes)."""

from __future__ import annotations

from typing import Optional

from rich.table import Table

from cli.app import console, format_bytes


def print_validation(report) -> None:
    """Rich tables: quality (baseline, patched, change), speed and memory, tasks; then the verdict."""
    q = report.quality
    damage = report.plan_damage
    predicted = None if damage is None else damage.plan  # the plan measured whole on calibration tokens
    table = Table(title="Quality on held-out text", title_justify="left")
    for column in ("", "baseline", "patched", "change") + (("predicted [95 %]",) if predicted else ()):
        table.add_column(column, justify="right" if column else "left")
    rows = [("perplexity", f"{q['ppl_baseline']:.4g}", f"{q['ppl_patched']:.4g}", f"{100 * q['ppl_change']:+.2f}%",
             lambda: signed_percent(predicted)),
            ("next-token KL (nats)", "", f"{q['kl_mean']:.4g}", "",
             lambda: f"{predicted.kl:.4g} [{predicted.kl_low:.4g}, {predicted.kl_high:.4g}]"),
            ("top-1 agreement", "", f"{100 * q['top1_agreement']:.1f}%", "", lambda: f"{100 * predicted.top1:.1f}%")]
    for label, base, patched, change, guess in rows:
        table.add_row(label, base, patched, change, *((guess(),) if predicted else ()))
    console.print(table)
    if predicted:
        console.print("predicted: the plan measured whole on the calibration tokens it was chosen on; patched and "
                      "change: measured on held-out text it never saw.", highlight=False)
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
    mode = f", {speed['mode']} mode" if speed.get("mode") else ""
    table = Table(title=f"Speed and memory (batch {base['batch']}, {base['prompt_len']}-token prompt, "
                        f"{base['n_new']} decoded tokens, {base['timer']}{mode})", title_justify="left")
    for column in ("", "baseline", "patched", "patched / baseline", "predicted"):
        table.add_column(column, justify="right" if column else "left")
    kv_pred = None if not predicted else 1 - predicted.get("kv_cache_fraction_saved", 0)
    rows = [("prefill tokens/s", "prefill_tokens_per_s", _num, None),
            ("decode tokens/s, eager", "decode_tokens_per_s", _num, None),
            *([("decode tokens/s, compiled", "compiled_decode_tokens_per_s", _num, None)]
              if base.get("compiled_decode_tokens_per_s") is not None else []),
            ("KV-cache bytes", "kv_cache_bytes", _bytes, kv_pred),
            ("K-cache bytes", "k_cache_bytes", _bytes, None),
            ("peak memory", "peak_memory_bytes", _bytes, None)]
    for label, key, fmt, pred in rows:
        r = ratio.get(key)
        table.add_row(label, fmt(base.get(key)), fmt(patched.get(key)), "" if r is None else f"{r:.3f}",
                      "" if pred is None else f"{pred:.3f}")
    console.print(table)
    for key in ("peak_memory_note", "compiled_note"):
        if speed.get(key):
            console.print(f"  ({speed[key]})", highlight=False)


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
    for column in ("layers", "spans", "heads", "proposed by", "predicted KL (spans summed)", "next-token KL",
                   "perplexity change [95 %]", "pass"):
        table.add_column(column, justify="left" if column in ("spans", "heads", "proposed by", "pass") else "right",
                         overflow="fold")
    candidates = sorted((r for r in search.rows if r.stage == "candidate"), key=lambda r: (r.n_shared, r.kl_mean))
    for r in candidates:
        cost, aligned = r.predicted_kl, r.aligned
        heads = "index" if not aligned else "aligned" if len(aligned) == r.n_shared else "aligned " + ",".join(map(str, aligned))
        table.add_row(str(r.n_shared), r.spans, heads, ", ".join(r.methods), "-" if cost is None else f"{cost:.4g}",
                      f"{r.kl_mean:.4g}",
                      f"{100 * r.ppl_change:+.2f}% [{100 * r.ppl_change_low:+.1f}, {100 * r.ppl_change_high:+.1f}]",
                      "yes" if r.passed else "no")
    console.print(table)
    singles = sorted(search.sensitivity.items(), key=lambda kv: kv[1])
    if singles:
        easy = ", ".join(f"{m} ({v:.3g})" for m, v in singles[:5])
        hard = ", ".join(f"{m} ({v:.3g})" for m, v in singles[-3:])
        console.print(f"Measured damage (next-token KL when shared alone with the layer before it, the better of index and head-aligned): "
                      f"least {easy}; most {hard}", highlight=False)
    best = search.best_plan
    if best is None:
        console.print("[bold red]No plan tried stays within the tolerance;[/] raise --tolerance or share fewer layers.")
    else:
        console.print(f"[bold]Best within tolerance:[/] {best.summary()} (spans {best.spans_spec()})", highlight=False)


def fields(values) -> dict:
    """A record's fields as a dict (a dict as it is): what the formatters of named values read."""
    return values.to_dict() if hasattr(values, "to_dict") else values


def signed_percent(values, key: str = "nll_change", missing: str = "-") -> str:
    """The relative perplexity change an NLL change in nats implies, with its interval where there is one:
    '+7.2% [+2.9, +11.6]' ('+7.2%' without one; `missing` when there is no value). Every table prints gaps so.
    `values`: a record (`Summary`, `HealedText`) or a dict with `key`, `key_low`, `key_high`."""
    import math

    values = fields(values)
    if values.get(key) is None:
        return missing
    text = f"{100 * math.expm1(values[key]):+.1f}%"
    if values.get(f"{key}_low") is not None and values.get(f"{key}_high") is not None:
        text += f" [{100 * math.expm1(values[key + '_low']):+.1f}, {100 * math.expm1(values[key + '_high']):+.1f}]"
    return text


def print_checked(checked: list, plan) -> None:
    """The whole plans measured to check interactions: the span model's prediction next to the measurement."""
    if len(checked) < 2:
        return
    table = Table(title="Whole plans measured (calibration tokens): the chosen plan and its neighbours", title_justify="left")
    for column in ("spans", "aligned", "predicted, spans summed (KL)", "whole plan (KL)", "whole / predicted", "perplexity", "chosen"):
        table.add_column(column, justify="left" if column in ("spans", "aligned", "chosen") else "right")
    for row in checked:
        predicted, measured = row["predicted"], row["measured"]
        ratio = "" if not predicted or predicted.kl <= 0 else f"{measured.kl / predicted.kl:.2f}"
        chosen = row["followers"] == plan.followers and row["aligned"] == plan.aligned_followers
        table.add_row(row["spans"], ",".join(map(str, row["aligned"])) or "-",
                      "-" if not predicted else f"{predicted.kl:.4f}", f"{measured.kl:.4f}", ratio,
                      signed_percent(measured), "yes" if chosen else "")
    console.print(table)
