"""`sa-analyze frontier`: the recommended plan at every budget, what each costs (predicted, measured, healed) and what
it saves: the curve that decides how many layers to share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import (DEFAULT_MODEL, DEFAULT_N_SEQS, AlignHeadsOpt, AllowMaskChangeOpt, AnalysisSeqLenOpt, DeviceMapOpt,
                     DeviceOpt, DtypeOpt, FirstShareableOpt, KeepOpt, MaxSpanOpt, NSeqsOpt, OptionalModelOpt, OutOpt,
                     RandomInitOpt, TextOpt, app, console, loading_status, spinner, user_errors, wrote)
from cli.tables import signed_percent
from sa_analysis import defaults
from sa_analysis.errors import UserError


@app.command("frontier")
@user_errors
def frontier(
    model: OptionalModelOpt = None,
    report: Annotated[Optional[Path], typer.Option("--report", "-r", help="A report.json written by `sa-analyze heatmap` (its model is loaded to measure damage).")] = None,
    budgets: Annotated[Optional[str], typer.Option("--budgets", "-b", help="Numbers of shared layers: a range and/or a list, e.g. 1-15 or 3,8,15. Default: 1 up to half the layers.")] = None,
    baselines: Annotated[Optional[str], typer.Option("--baselines", help="Measure beside each budget's plan the plans a researcher tries first, chosen on the same calibration tokens and judged on the same held-out tokens (paired intervals): all, or any of last-k, contiguous, greedy (SLEB-style; it measures every layer at every step up to the largest budget).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, help="Largest relative perplexity increase that counts as within (0.05 = +5%): the frontier names the largest budget within it, before and after healing.")] = defaults.TOLERANCE,
    heal_steps: Annotated[int, typer.Option("--heal-steps", min=0, help="Heal each plan with this many LoRA steps and judge it against the control (0: no healing).")] = 0,
    heal_data: Annotated[Optional[Path], typer.Option("--heal-data", help="Healing data (Alpaca JSON/JSONL or text). Default: the calibration part of the default text.")] = None,
    other_text: Annotated[Optional[str], typer.Option("--other-text", help="The second held-out text healed plans are judged on, of another kind than the healing data: a file, or python-source / pydoc_data.topics. Default: python-source when healing on the default text.")] = None,
    control: Annotated[bool, typer.Option("--control/--no-control", help="With --heal-steps: judge healed plans against the unshared model healed the same way (cached). --no-control: recovery is not measured.")] = True,
    heal_objective: Annotated[str, typer.Option("--heal-objective", help="lm: heals learn the healing text (judged against the control); distill: heals restore the untouched model, KL(untouched || shared) at every position (its control is the untouched model).")] = "lm",
    heal_lm_weight: Annotated[float, typer.Option("--heal-lm-weight", min=0.0, help="With --heal-objective distill: weight of the LM loss beside the KL.")] = 0.0,
    heal_method: Annotated[str, typer.Option("--heal-method", help="lora (adapters) or full (a full fine-tune of what --heal-full-scope and --heal-train-layers choose).")] = "lora",
    heal_lora_mlp: Annotated[bool, typer.Option("--heal-lora-mlp", help="LoRA on the MLP projections too.")] = False,
    heal_full_scope: Annotated[str, typer.Option("--heal-full-scope", help="With --heal-method full: all, attention, or followers-vo (the followers' value and output projections).")] = "all",
    heal_train_layers: Annotated[str, typer.Option("--heal-train-layers", help="all, from-anchor or from-follower.")] = "all",
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank of the heals.")] = 16,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate of the heals. Default: 1e-3.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per heal step.")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Heal data order and adapter initialisation.")] = 0,
    first_shareable: FirstShareableOpt = 1,
    keep: KeepOpt = None,
    max_span: MaxSpanOpt = None,
    align_heads: AlignHeadsOpt = "auto",
    allow_mask_change: AllowMaskChangeOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Go on from the measurements a stopped run saved under --out (frontier_state.json).")] = False,
    out: OutOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    text: TextOpt = None,
    n_seqs: NSeqsOpt = DEFAULT_N_SEQS,
    seq_len: AnalysisSeqLenOpt = None,
    random_init: RandomInitOpt = False,
    device_map: DeviceMapOpt = None,
) -> None:
    """The sharing frontier: for each number of shared layers, the plan `recommend-spans` would give, its predicted
    damage (calibration text), its measured perplexity on held-out text and what it saves (KV cache, Q/K and score
    FLOPs); with --heal-steps, each plan healed and judged against the control. Measurements are shared across
    budgets and saved as they are made (--resume goes on from them). Writes frontier.json and frontier.png."""
    from sa_analysis.prechecks import check_frontier, check_heal_objective, parse_baselines, parse_budgets

    check_heal_objective(heal_objective, heal_lm_weight, "--heal-objective")
    if not heal_steps and (heal_objective != "lm" or heal_lm_weight or heal_method != "lora" or heal_lora_mlp):
        raise UserError("The --heal-* options choose how each plan is healed; add --heal-steps N (N > 0) to heal them.")
    methods = parse_baselines(baselines)
    wanted = check_frontier((model or DEFAULT_MODEL) if report is None else None, budgets=parse_budgets(budgets),
                            baselines=methods, text=text, seq_len=seq_len, heal=bool(heal_steps), heal_data=heal_data,
                            other_text=other_text)
    from sa_analysis.pipeline import HealConfig, ModelSpec, PlanConstraints, TextSpec, run_frontier

    constraints = PlanConstraints.parse(first_shareable, keep, max_span, align_heads, allow_mask_change)
    config = None
    if heal_steps:
        config = HealConfig(method=heal_method, objective=heal_objective, lm_weight=heal_lm_weight, lora_rank=lora_rank,
                            lora_mlp=heal_lora_mlp, full_scope=heal_full_scope, train_layers=heal_train_layers, lr=lr,
                            steps=heal_steps, batch_size=batch_size, seq_len=seq_len or defaults.SEQ_LEN, seed=seed)
    with spinner("sharing frontier") as shown:
        result = run_frontier(ModelSpec(model or (None if report is not None else DEFAULT_MODEL), device, dtype,
                                        random_init, device_map),
                              TextSpec(text, n_seqs, seq_len), report=report, budgets=wanted, constraints=constraints,
                              baselines=methods,
                              tolerance=tolerance, heal_config=config, heal_data=heal_data, other_text=other_text,
                              control=control, out=out, resume=resume, status=loading_status,
                              progress=lambda message: shown.update(message))
    print_frontier(result.frontier)
    print_baselines(result.frontier)
    wrote(result.files)


def print_frontier(frontier) -> None:
    """One row per budget: the plan, predicted and measured perplexity change with intervals, the savings, and after
    healing the three yardsticks per held-out text (against the untouched model, against the control, KL to the
    untouched model); then the largest budget within the tolerance by each."""
    points = frontier.points
    texts = list(points[0].healed) if points and points[0].healed else []
    distill = (frontier.heal or {}).get("objective") == "distill"
    base = frontier.baseline["perplexity"]
    table = Table(title=f"Sharing frontier of {frontier.model.get('name')}: held-out perplexity {base:.4g} unshared "
                        f"({frontier.heldout.get('n_seqs')} x {frontier.heldout.get('seq_len')} held-out tokens)")
    short = {t: t.split(",")[0] for t in texts}  # "heal data, held out" -> "heal data"
    healed_columns = [c for t in texts for c in (f"{short[t]} vs untouched", *([] if distill else [f"{short[t]} vs control"]),
                                                  f"{short[t]} KL")]
    columns = ["shared", "followers (ᵃ head-aligned)", "predicted [95 %]", "held-out [95 %]", "KV cache", "Q/K proj.",
               "scores"] + healed_columns + ["measurements"]
    for column in columns:
        table.add_column(column, justify="left" if column.startswith("followers") else "right", overflow="fold")
    for p in points:
        aligned = set((p.plan.get("head_map") or {}).keys())
        followers = ", ".join(f"{m}{'ᵃ' if str(m) in aligned else ''}" for m in p.plan["followers"])
        s = p.savings
        healed = [c for t in texts for c in _healed_cells(p.healed.get(t) if p.healed else None, distill)]
        table.add_row(str(p.budget), followers, signed_percent(p.predicted), _ppl_interval(p.heldout, base),
                      f"{s['kv_cache_fraction_saved']:.1%}", _fraction(s.get("attn_proj_fraction_saved")),
                      f"{s['score_fraction_saved']:.1%}", *healed, str(p.measurements))
    console.print(table)
    console.print("predicted: the plan measured whole on calibration tokens (exp(NLL change) - 1); held-out: measured on "
                  "text the planner never saw, against the unshared model; savings as shares of the KV cache at "
                  f"{points[0].savings.get('context_len') if points else '?'} tokens, of the attention projections' FLOPs "
                  "and of the attention-score FLOPs; measurements: output-damage measurements made so far (shared by "
                  "every budget).", highlight=False)
    if texts:
        from sa_analysis.pipeline import YARDSTICKS

        console.print(f"After healing ({(frontier.heal or {}).get('objective', 'lm')} heals; heal data: the held-out part "
                      f"of the healing data, other text: a text of another kind): {YARDSTICKS}.", highlight=False)
    within = frontier.within()
    line = f"Within +{100 * frontier.tolerance:g}%: {_budget(within['before'])} before healing"
    for text, budget in within["after_untouched"].items():
        line += f"; {_budget(budget)} after healing against the untouched model ({text})"
    if not distill:
        for text, budget in within["after"].items():
            line += f"; {_budget(budget)} against the control ({text})"
    console.print(f"[bold]{line}[/] (of {frontier.model.get('n_layers')} layers).", highlight=False)
    if texts and within.get("kl_bound"):
        bound = ", ".join(f"{t} {v:.3f}" for t, v in within["kl_bound"].items())
        console.print(f"[bold]Faithful reach: {_budget(within['faithful'])}[/] (within +{100 * frontier.tolerance:g}% of "
                      f"the untouched model on every text and no further from it in next-token KL than the "
                      f"{within['before']}-layer plan before healing: {bound} nats).", highlight=False)
    if frontier.heal and frontier.heal.get("control") is None and not distill:
        console.print("note: no control heal: recovery under the same fine-tune is not measured.", highlight=False)


def print_baselines(frontier) -> None:
    """With --baselines: at each budget the recommended plan and each baseline on the same held-out tokens, and each
    baseline against the recommendation (paired over sequences; positive: the baseline is worse)."""
    points = [p for p in frontier.points if p.baselines]
    if not points:
        return
    base = frontier.baseline["perplexity"]
    table = Table(title="The plans a researcher tries first, beside the recommendation (same calibration and held-out tokens)")
    for column in ("shared", "method", "followers (ᵃ head-aligned)", "calibration KL", "held-out [95 %]",
                   "vs recommended [95 %]"):
        table.add_column(column, justify="left" if column in ("method", "followers (ᵃ head-aligned)") else "right",
                         overflow="fold")
    for p in points:
        aligned = set((p.plan.get("head_map") or {}).keys())
        followers = ", ".join(f"{m}{'ᵃ' if str(m) in aligned else ''}" for m in p.plan["followers"])
        table.add_row(str(p.budget), "recommended", followers, f"{p.predicted.kl:.3f}", _ppl_interval(p.heldout, base), "")
        for method, row in p.baselines.items():
            mid, low, high = (100 * v for v in row.vs_recommended)
            table.add_row("", method, ", ".join(f"{m}{'ᵃ' if m in row.aligned else ''}" for m in row.followers),
                          f"{row.calibration.kl:.3f}", _ppl_interval(row.heldout, base),
                          f"{mid:+.1f}% [{low:+.1f}, {high:+.1f}]")
    console.print(table)
    console.print("calibration KL: what each method saw when it chose (next-token KL on the calibration tokens); "
                  "held-out: against the unshared model; vs recommended: held-out perplexity ratio - 1 against the "
                  "recommended plan of the same budget, paired over the same sequences.", highlight=False)


def _healed_cells(values, distill: bool) -> list[str]:
    """The healed cells of one text (a `HealedText`): against the untouched model and the control (perplexity ratio,
    paired 95 % interval over sequences), and KL to the untouched model before -> after healing."""
    if values is None:
        return ["", *([] if distill else [""]), ""]
    untouched = signed_percent(values, "after_untouched")
    kl = (f"{values.kl_before:.3f} -> {values.kl_after:.3f}"
          if values.kl_before is not None and values.kl_after is not None else "n/a")
    return [untouched, *([] if distill else [_healed(values)]), kl]


def _budget(value) -> str:
    return "no budget" if value is None else f"up to {value} layers"


def _healed(values) -> str:
    """Healed shared against the control (perplexity ratio), with its paired 95 % interval over sequences (nats)."""
    if values.change is None:
        return "n/a"
    return signed_percent({"after": math.log1p(values.change), "after_low": values.after_low,
                           "after_high": values.after_high}, "after")


def _fraction(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _ppl_interval(values, base: float) -> str:
    """A held-out `Summary`'s perplexity against `base`, in % with its interval."""
    mid, low, high = (100 * (p / base - 1) for p in (values.perplexity, values.perplexity_low, values.perplexity_high))
    return f"{mid:+.1f}% [{low:+.1f}, {high:+.1f}]"
