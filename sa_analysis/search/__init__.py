"""Searching for plans across budgets by measured output damage: where planning by measurement lives (the planner
prices and chooses; `damage` measures and plans at one budget; `search` walks the budgets).

- `sweep`: `BudgetSweep`, the one budget sweep: the plan of least measured damage at each budget, on one recorded
  prefix of the calibration tokens and one table of measurements.
- `plans`: `search_plans` (`recommend-spans --validate`): every budget's plan and its neighbours measured whole,
  the similarity planners' plans beside them, the best within the tolerance proved on held-out text (`validate`).
- `frontier`: `measure_frontier` (`frontier`): the recommended plan at each budget, predicted, measured on held-out
  text (the one held-out measurement, `damage.heldout`), what it saves; `Frontier`, its reach before and after healing.
- `baselines`: the plans a researcher tries first (last k layers, best contiguous span, SLEB-style greedy), chosen on
  the same calibration tokens and judged beside the recommendation (`frontier --baselines`).
"""

from .frontier import Frontier, FrontierPoint, FrontierState, measure_frontier
from .plans import PlanSearch, search_plans
from .sweep import BudgetSweep

__all__ = ["BudgetSweep", "Frontier", "FrontierPoint", "FrontierState", "PlanSearch", "measure_frontier", "search_plans"]
