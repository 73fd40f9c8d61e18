"""The default model's plan and a validation of it, made the way `recommend-spans` and `validate` make them, small
enough for the suite: the files `tests/test_unchanged.py` compares with those saved in `tests/data/golden/` (made by
`python -m tests.golden DIR` and copied there: before the damage package moved, and again when the document separator
changed), so a change of the house that changes a plan, a number or a file written fails there."""

from __future__ import annotations

import sys
from pathlib import Path

from sa_analysis.pipeline import ModelSpec, PlanConstraints, TextSpec, run_plan, run_validate

BUDGET = "2"
CONSTRAINTS = PlanConstraints(first_shareable=25)  # 5 shareable layers: a dozen measurements, not sixty
N_SEQS, SEQ_LEN = 2, 128


def make(out: Path) -> list[Path]:
    """Plan on the default model (measured damage), then validate that plan on held-out text; returns the files."""
    result = run_plan(None, ModelSpec(), TextSpec(None, N_SEQS, SEQ_LEN), budget=BUDGET, constraints=CONSTRAINTS,
                      out=out / "plan")
    _report, path = run_validate(ModelSpec(), TextSpec(None, N_SEQS, SEQ_LEN), plan_file=out / "plan" / "plan.json",
                                 measure_speed=False, out=out / "validate")
    return result.files + [path]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for written in make(out):
        print(written)
