"""Measured output damage, and planning by it: what sharing a plan's layers does to the model's next-token
distribution on calibration tokens, measured, tabled and searched.

- `record`: the data. `Damage` (one patched run against the baseline, per sequence) and `PlanDamage` (a plan's
  damage: each follower alone, the span model's sum, the whole plan as measured, the baselines, with intervals and
  what they rest on), which the planner's `SharePlan`, the plan JSON, the CLI tables, the figures and `validate`
  read. Standard library only: the planner carries it.
- `compare`: the one comparison of log-probabilities (per sequence, one chunk size), also used by `validate`.
- `prefix`: `PrefixRun`, the unpatched model recorded once on calibration tokens, each plan replayed from its lowest
  anchor on (`parts.replay_from`).
- `table`: `DamageTable`, the measurements (pairs alone, spans whole), the planner's prices from them, the span
  model's prediction for a plan.
- `measure`: `plan_from_damage`, the plan of least measured damage (measure, re-plan until the plan rests on
  measurements, check it and its neighbours whole), and the similarity baselines measured the same way.
- `baselines`: the plans a researcher tries first (last k layers, best contiguous span, SLEB-style greedy).

Only `record` is imported here: the planner reads it, and the other modules (which need torch, the patch and the
planner) are imported by name (`from sa_analysis.damage.measure import plan_from_damage`).
"""

from .record import Damage, PlanDamage

__all__ = ["Damage", "PlanDamage"]
