"""`validate_plan`: one plan proved by measurement on held-out text, in one ValidationReport."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence


from .. import defaults
from ..artefact import provenance
from ..errors import UserError
from ..patch import check_mode
from .plans import as_plan, check_plan_for_model, predicted_savings
from ..damage.logprobs import token_ids
from ..damage.heldout import Untouched
from ..parts import model_device
from .quality import measure_quality, untouched
from .report import DEFAULT_TOLERANCE, ValidationReport
from .speed import compare_speed
from .tasks import check_tasks, compare_tasks

if TYPE_CHECKING:
    from ..data import Tokens
    from ..loading import LoadedModel, ModelInfo
    from ..planner.plan import PlanLike


def validate_plan(
    loaded: LoadedModel,
    plan: PlanLike,
    batch: Tokens,
    *,
    mode: str = "fast",
    tolerance: float = DEFAULT_TOLERANCE,
    tasks: Sequence[str] | None = None,
    task_limit: int | None = None,
    measure_speed: bool = True,
    speed_batch: int | None = None,
    speed_new_tokens: int = defaults.DECODE_TOKENS,
    speed_repeats: int = 3,
    batch_size: int = 4,
    untouched_outputs: Untouched | None = None,
) -> ValidationReport:
    """Baseline vs patched on the held-out `batch` (a TokenBatch of split "heldout", or ids [S, T]).

    `plan`: a SharePlan, `{follower: anchor}`, or a spans string. Passes when the relative perplexity increase is
    at most `tolerance`. Speed uses the first `speed_batch` sequences (default: all, at most 8) as the prompt, and
    for fast mode the inference path (`mode="infer"`: the same prefill, decode steps reusing the anchor's row, equal
    to exact mode to the model's precision): eager decoding everywhere, compiled decoding on a GPU.
    """
    if isinstance(getattr(batch, "split", None), str) and batch.split != "heldout":
        raise UserError("Validation must run on held-out text, never the calibration text the plan was chosen on; use split='heldout'.")
    check_options(mode, tolerance)
    if tasks:
        check_tasks(tasks)
    model, info = loaded.model, loaded.info
    share_plan = as_plan(plan, info.n_layers, info.shape())
    check_plan_for_model(share_plan, info)
    base = untouched_outputs or untouched(model, batch, batch_size)  # the unpatched model, recorded once
    quality = measure_quality(model, share_plan, base, mode)
    ids = token_ids(batch)
    speed = None
    if measure_speed:
        prompt = ids[: speed_batch or min(ids.shape[0], 8)]
        speed_mode = "infer" if mode == "fast" else mode  # fast mode's prefill, the inference path's decode steps
        speed = compare_speed(model, share_plan, prompt, speed_mode, speed_new_tokens, repeats=speed_repeats)
    task_results = compare_tasks(model, loaded.tokenizer, share_plan, tasks, mode, task_limit) if tasks else None
    meta = provenance(model_device(model))
    notes = mask_notes(share_plan, info, ids.shape[1])
    if notes:
        meta["notes"] = notes
    return ValidationReport(
        model=info.to_dict(), plan=share_plan.to_dict(), mode=mode, tolerance=float(tolerance),
        data=batch.describe() if hasattr(batch, "describe") else {"n_seqs": ids.shape[0], "seq_len": ids.shape[1]},
        quality=quality, passed=bool(quality["ppl_change"] <= tolerance), speed=speed,
        predicted=predicted_savings(share_plan, info, ids.shape[1]), tasks=task_results, meta=meta,
    )


def mask_notes(plan: PlanLike, info: ModelInfo, seq_len: int) -> list[str]:
    """What sharing does to followers whose anchor's mask differs from their own, and, when the held-out sequences
    are no longer than the window involved, that this validation cannot see it."""
    from ..planner import layer_windows, mask_note

    windows = layer_windows(info.shape(), info.n_layers)
    notes = []
    for follower, anchor in plan.anchor_of.items():
        note = mask_note(follower, anchor, windows)
        if note is None:
            continue
        window = max(w for w in (windows[follower], windows[anchor]) if w is not None)
        if seq_len <= window:
            note += (f"; {seq_len}-token sequences never reach that window, so this validation cannot see it "
                     f"(validate with --seq-len {2 * window}, or --tasks passkey)")
        notes.append(note)
    return notes


def check_options(mode: str, tolerance: float) -> None:
    check_mode(mode)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise UserError(f"The tolerance must be a number >= 0 (a relative perplexity increase, e.g. 0.05); got {tolerance!r}.")
