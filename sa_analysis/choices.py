"""Options that take one of a few names, checked with one sentence and a 'did you mean' before torch is imported (the
CLI's checks before loading and the library's configs both ask here, so a name is refused the same way by both)."""

from __future__ import annotations

import difflib
import math

from . import defaults
from .errors import UserError


def check_choice(value: str, choices: tuple[str, ...], what: str, flag: str) -> None:
    """`value` must be one of `choices`; else one sentence naming them and the nearest one."""
    if value in choices:
        return
    near = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise UserError(f"Unknown {what} {value!r}{hint}; use {flag} {' or '.join(choices)}.")


def check_heal_objective(objective: str, lm_weight: float = 0.0, flag: str = "--objective") -> None:
    """A known heal objective (`defaults.HEAL_OBJECTIVES`), and an LM-loss weight only beside distillation."""
    check_choice(objective, defaults.HEAL_OBJECTIVES, "heal objective", flag)
    if not (math.isfinite(lm_weight) and lm_weight >= 0):
        raise UserError(f"The LM-loss weight must be 0 or a positive number; got {lm_weight}.")
    if lm_weight and objective != "distill":
        raise UserError(f"The LM-loss weight goes beside distillation; use it with {flag} distill.")


LAST_K, CONTIGUOUS, GREEDY = "last k layers", "best contiguous span", "greedy (SLEB)"
BASELINES = (LAST_K, CONTIGUOUS, GREEDY)  # the plans a researcher tries first (`search.baselines`)
BASELINE_FLAGS = {"last-k": LAST_K, "contiguous": CONTIGUOUS, "greedy": GREEDY}  # their names on the command line


def parse_baselines(spec: str | None, flag: str = "--baselines") -> tuple[str, ...]:
    """`--baselines` ("all", or names joined by commas: last-k, contiguous, greedy) as method names, in the order
    given; one sentence with a 'did you mean' for an unknown name."""
    if spec is None or not spec.strip():
        return ()
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        check_choice(name, ("all", *BASELINE_FLAGS), "baseline", flag)
    if "all" in names:
        return BASELINES
    return tuple(BASELINE_FLAGS[name] for name in dict.fromkeys(names))


def parse_rows(rows: str | int | None, seq_len: int | None = None, path: str = "auto") -> str | int:
    """`--rows`: "auto" (all query rows unless that would take too long), "all", or how many rows to sample per
    sequence (at least 4 per replicate, so that the standard errors mean something; fewer than half of `seq_len`
    when it is known; only the streaming path samples)."""
    if rows is None:
        return defaults.ROWS
    text = str(rows).strip().lower()
    if text in ("auto", "all"):
        return text
    least = 4 * defaults.REPLICATES
    try:
        count = int(text)
    except ValueError:
        raise UserError(f"--rows {rows!r} is not auto, all or a number of rows; e.g. --rows 8192.") from None
    if count < least:
        raise UserError(f"--rows {count} is too few to sample: use at least {least} rows ({defaults.REPLICATES} "
                        f"replicates of 4), or --rows all.")
    if seq_len is not None and 2 * count > seq_len:
        raise UserError(f"--rows {count} is half or more of the {seq_len} query rows of a sequence, where sampling "
                        f"saves little; use --rows all, or fewer rows.")
    if path == "maps":
        raise UserError("--rows N samples query rows, which only the streaming path does; drop --path maps.")
    return count
