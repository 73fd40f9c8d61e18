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
