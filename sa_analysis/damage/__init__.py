"""Measured output damage, and planning by it: what sharing a plan's layers does to the model's next-token
distribution on calibration tokens, measured, tabled and searched.

- `logprobs`: the one comparison of log-probabilities (per sequence, one chunk size), also used by `validate`.
- `prefix`: `PrefixRun`, the unpatched model recorded once on calibration tokens, each plan replayed from its lowest
  anchor on (`parts.replay_from`).
- `table`: `DamageTable`, the measurements (pairs alone, spans whole), the planner's prices from them, the span
  model's prediction for a plan.
- `measure`: `plan_from_damage`, the plan of least measured damage (measure, re-plan until the plan rests on
  measurements, check it and its neighbours whole), and the similarity planners' plans measured the same way.
- `heldout`: the one held-out measurement, any state of the model against the untouched model.

Words: the *untouched* model is the model as loaded (no sharing, no training); *baselines* are other plans held
against the recommendation (the similarity planners' here and in a plan's `damage.baselines`; the plans a
researcher tries first in `search.baselines`); `logprobs` compares log-probabilities, `run_compare` checkpoints.

The data it produces (`Damage`, `PlanDamage`) is the planner's (`planner.record`: `SharePlan` carries it), so the
whole package stands on one floor, above the planner and the patch. Its modules need torch and are imported by name
(`from sa_analysis.damage.measure import plan_from_damage`).
"""

