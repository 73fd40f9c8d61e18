"""`sa-analyze recommend-spans`: choose which layers share attention, compare with the baselines, show the savings."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import (
    AlignHeadsOpt, AllowMaskChangeOpt, FirstShareableOpt, KeepOpt, MaxSpanOpt, AnalysisSeqLenOpt, DEFAULT_MODEL, DEFAULT_N_SEQS, DeviceMapOpt, DeviceOpt, DtypeOpt, NSeqsOpt, OptionalModelOpt, OutOpt,
    RandomInitOpt, RowsOpt, TextOpt, app, console, format_bytes, loading_status, print_note, sequence_progress, spinner,
    user_errors, wrote,
)
from cli.tables import fields, print_checked, signed_percent
from sa_analysis import defaults



@app.command("recommend-spans")
@user_errors
def recommend_spans(
    report: Annotated[Optional[Path], typer.Option("--report", "-r", help="A report.json written by `sa-analyze heatmap` (no model needed).")] = None,
    model: OptionalModelOpt = None,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="Layers to share: a count (8) or a fraction of all layers (0.25). Default: 25%.")] = None,
    max_cost: Annotated[Optional[float], typer.Option("--max-cost", help="Instead of a budget: share as many layers as possible with total predicted cost <= this (nats of next-token KL when priced by measured damage, the --cost's units by similarity).")] = None,
    cost: Annotated[str, typer.Option("--cost", help="The attention cost of similarity pricing (and of the baselines' table): kl (KL(follower||anchor)), cosine, cosine_row (1 - cosine), or js (adjacent layers only).")] = "kl",
    first_shareable: FirstShareableOpt = 1,
    keep: KeepOpt = None,
    max_span: MaxSpanOpt = None,
    align_heads: AlignHeadsOpt = "auto",
    allow_mask_change: AllowMaskChangeOpt = False,
    context_len: Annotated[int, typer.Option("--context-len", min=1, help="Context length for the predicted score-FLOP and K-cache savings.")] = defaults.CONTEXT_LEN,
    out: OutOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: AnalysisSeqLenOpt = None,
    random_init: RandomInitOpt = False,
    device_map: DeviceMapOpt = None,
    exclude_first: Annotated[int, typer.Option("--exclude-first", min=0, help="When capturing: ignore the first k key positions (attention sinks).")] = 0,
    rows: RowsOpt = "auto",
    predict: Annotated[str, typer.Option("--predict", help="How plans are priced. output: each follower's measured damage to the model's next-token distribution on calibration tokens, whole plans checked for interactions; similarity: the report's attention cost alone (weaker); auto: output whenever the model is loaded (no --report).")] = "auto",
    validate: Annotated[bool, typer.Option("--validate", help="Measure candidate plans on the model (sensitivity fed back to the planner) and keep the best within --tolerance, checked on held-out text.")] = False,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, help="With --validate: largest relative perplexity increase that passes (0.05 = +5%).")] = defaults.TOLERANCE,
) -> None:
    """Recommend Shared Attention spans: the cheapest layers to share for a budget, from a saved report or a fresh capture."""
    from sa_analysis.prechecks import check_before_loading, parse_rows

    from sa_analysis.prechecks import check_plan_options

    check_plan_options(budget, max_cost, cost, predict)
    if report is None:  # mistakes that need no model are answered before torch is imported
        rows = parse_rows(rows, seq_len)
        check_before_loading(model or DEFAULT_MODEL, text=text, seq_len=seq_len)
    from sa_analysis.pipeline import CaptureSpec, ModelSpec, PlanConstraints, TextSpec, run_plan, run_search

    constraints = PlanConstraints.parse(first_shareable, keep, max_span, align_heads, allow_mask_change)
    source = ModelSpec(model or (None if report is not None else DEFAULT_MODEL), device, dtype, random_init, device_map)
    shown_while_measuring = dict(progress=sequence_progress, status=loading_status, notice=print_note) if report is None else {}
    with spinner("measuring output damage") as shown:
        result = run_plan(report, source, TextSpec(text, n_seqs, seq_len), CaptureSpec(exclude_first, rows=rows),
                          budget=budget, max_cost=max_cost, cost=cost, constraints=constraints, context_len=context_len,
                          out=out, predict=predict, say=lambda message: shown.update(message), **shown_while_measuring)
    plan = result.plan
    _print_plan(plan)
    if result.damage is not None:
        print_checked(result.damage.checked, plan)
    _print_comparison(result.alternatives, cost, plan)
    _print_savings(plan)
    console.print(f"Seed repo's form — layers not shared: {plan.non_shared_layers()}", highlight=False)
    if plan.n_shared:
        how = f"--plan {result.out / 'plan.json'}" if plan.head_map else f"--spans {plan.spans_spec()}"  # spans carry no head maps
        console.print(f"Validate with: sa-analyze validate {how}", highlight=False)
    wrote(result.files)
    if validate:
        from cli.tables import print_search, print_validation

        with spinner("measuring plans") as shown:
            search, paths = run_search(
                result.report, result.source,
                TextSpec(text, n_seqs, seq_len or result.report.seq_len or defaults.SEQ_LEN),
                out=result.out, max_budget=plan.n_shared, tolerance=tolerance, loaded=result.loaded, damage=result.damage,
                cost=cost, constraints=PlanConstraints(first_shareable, constraints.keep, plan.constraints.get("max_span"),
                                                       constraints.align_heads, constraints.mask_change),
                progress=lambda message: shown.update(f"[bold]{message}[/]"))
        print_search(search)
        if search.validation is not None:
            print_validation(search.validation)
        wrote(paths)


# ----- printing ---------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def _ranges(layers: list[int]) -> str:
    """[23, 24, 25, 27] -> "23-25, 27"."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}-{layer}" if layer > start else f"{start}")
            start = None
    return ", ".join(parts) or "none"


def _print_plan(plan) -> None:
    """One row per follower: its anchor, how its heads share, its predicted cost (measured output damage with its
    interval when the plan was measured, else the attention cost), how often a bootstrap rerun chose it."""
    damage = plan.damage
    title = f"Recommended plan ({plan.method}, cost {plan.cost_name}): {plan.n_shared} of {plan.n_layers} layers shared"
    table = Table(title=title)
    cost_column = "next-token KL alone [95 %]" if damage else "predicted cost"
    columns = ["follower", "anchor", "heads", cost_column, "by index"]
    columns += ["perplexity alone"] if damage else ["chosen again"]
    for column in columns + ["mask"]:
        table.add_column(column, justify="left" if column in ("heads", "mask") else "right", overflow="fold")
    costs = plan.follower_costs or {}
    stability = (plan.stability or {}).get("followers", {})
    for follower, anchor in plan.anchor_of.items():
        aligned = follower in plan.head_map
        alone = damage.followers.get(follower) if damage else None
        cost_text = _kl_interval(alone) if alone else _fmt(costs.get(follower))
        last = signed_percent(alone, "nll_change") if alone else _share(stability.get(follower))
        table.add_row(str(follower), str(anchor), "aligned" if aligned else "index", cost_text,
                      _fmt(plan.index_costs.get(follower)) if aligned else "", last, plan.mask_notes.get(follower, "same"))
    table.add_section()
    if damage:
        predicted, whole = damage.predicted, damage.plan
        for name, span in (predicted.spans if predicted else {}).items():
            table.add_row(f"span {name}", str(span.anchor), "whole", _kl_interval(span), "",
                          signed_percent(span, "nll_change"), "")
        if predicted:
            table.add_row("predicted", "", f"{len(plan.head_map)} aligned", _kl_interval(predicted), "",
                          signed_percent(predicted, "nll_change"), "")
        table.add_row("whole plan", "", "", _kl_interval(whole), "", signed_percent(whole, "nll_change"), "")
    else:
        same = (plan.stability or {}).get("same_plan")
        table.add_row("total", "", f"{len(plan.head_map)} aligned", _fmt(plan.total_cost), "",
                      f"{_share(same)} same plan" if same is not None else "", "")
    console.print(table)
    if damage:
        console.print(f"Predicted on {damage.n_tokens} calibration tokens ({damage.n_seqs} sequences): each follower "
                      f"shared alone; each span of two or more followers measured whole (followers of one anchor "
                      f"interact); the prediction, its spans summed (the model the planner optimises); and the whole "
                      f"plan measured as it is (spans interact little); perplexity = exp(NLL change) - 1. "
                      f"`sa-analyze validate` measures it on held-out text.", highlight=False)
    if plan.stability:
        console.print(f"chosen again: share of {plan.stability['resamples']} planner reruns on bootstrap resamples of the "
                      f"analysed sequences that chose the follower (and the whole plan)", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)


def _kl_interval(values) -> str:
    values = fields(values)
    return f"{values['kl']:.4f} [{values['kl_low']:.4f}, {values['kl_high']:.4f}]"


def _share(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _print_comparison(plans: dict, cost: str, plan) -> None:
    """The recommendation beside the baselines with as many shared layers: their attention cost (what similarity
    planners minimise) and, when the plan was chosen by measured damage, each measured whole on the same tokens."""
    measured = {name: row.measured for name, row in plan.damage.baselines.items()} if plan.damage else {}
    if plan.damage:
        measured["optimal"] = plan.damage.plan
    title = "Alternatives with the same number of shared layers"
    title += (": next-token KL measured whole on the calibration tokens, and the attention cost similarity planners "
              f"minimise ({cost})") if measured else f" (predicted {cost} cost, same cost matrix)"
    table = Table(title=title)
    columns = ["method", "n shared", "followers"]
    columns += ["next-token KL [95 %]", "perplexity", f"attention cost ({cost})"] if measured else ["total predicted cost"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "followers") else "right")
    for name, alternative in plans.items():
        if isinstance(alternative, str):
            table.add_row(name, "-", alternative, *(["n/a"] * (len(columns) - 3)))
            continue
        row = [name, str(alternative.n_shared), _ranges(alternative.followers)]
        whole = measured.get(name)
        if measured:
            row += [_kl_interval(whole), signed_percent(whole, "nll_change")] if whole else ["n/a", ""]
        table.add_row(*row, _fmt(alternative.total_cost))
    console.print(table)


def _print_savings(plan) -> None:
    s = plan.savings()
    table = Table(title=f"Predicted savings ({s['bytes_per_element']}-byte cache entries, context {s['context_len']} tokens)")
    for column in ("quantity", "saved", "of total", "fraction"):
        table.add_column(column, justify="left" if column == "quantity" else "right")
    rows = [
        ("K-cache bytes per token (every layer caching it)", "k_cache_bytes_saved_per_token", "kv_cache_bytes_per_token", None, _bytes),
        (f"KV-cache bytes per sequence of {s['context_len']} (windows counted)", "kv_cache_bytes_saved_at_context",
         "kv_cache_bytes_at_context", "kv_cache_fraction_saved", _bytes),
        ("Q/K projection FLOPs per token", "qk_proj_flops_saved_per_token", "attn_proj_flops_per_token", "attn_proj_fraction_saved", _count),
        (f"score (QK^T) FLOPs per token at {s['context_len']}", "score_flops_saved_per_token", "score_flops_per_token", "score_fraction_saved", _count),
    ]
    for label, saved, total, fraction, fmt in rows:
        table.add_row(label, fmt(s.get(saved)), fmt(s.get(total)) if total else "",
                      f"{s[fraction]:.1%}" if fraction and s.get(fraction) is not None else "")
    console.print(table)


def _bytes(value) -> str:
    return format_bytes(value, missing="n/a (shape unknown)")


def _count(value: int | None) -> str:
    if value is None:
        return "n/a (shape unknown)"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"
