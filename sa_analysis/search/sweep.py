"""The one budget sweep: the plan of least measured damage at each budget, ascending, all on one `PrefixRun` of the
calibration tokens and one `DamageTable`, so a pair or a span measured for one budget is not measured again for the
next (a sweep costs little more than its largest budget alone). `search_plans` (`recommend-spans --validate`) and
`measure_frontier` (`frontier`) both walk it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

from ..damage.measure import DamageSearch, Meter, check_report_fits, plan_from_damage
from ..damage.prefix import PrefixRun
from ..damage.table import DamageTable
from ..planner import PlanConstraints
from ..progress import Say

if TYPE_CHECKING:
    from ..data import Tokens
    from ..loading import LoadedModel
    from ..report import AttentionReport


@dataclass
class BudgetSweep:
    """What every budget of a sweep shares: the model, its attention report, the calibration tokens' recorded prefix,
    the table of measurements and the meter that counts them."""

    loaded: "LoadedModel"
    report: "AttentionReport"
    run: PrefixRun
    table: DamageTable
    meter: Meter
    constraints: PlanConstraints

    @classmethod
    def start(cls, loaded: "LoadedModel", report: "AttentionReport", calibration: Tokens, *,
              constraints: PlanConstraints = PlanConstraints(), table: DamageTable | None = None,
              progress: Say | None = None) -> "BudgetSweep":
        """Record the unpatched model once on `calibration` (a TokenBatch or ids [S, T]); `table`: measurements made
        before (a resumed run), reused and extended."""
        check_report_fits(report, loaded)
        run = PrefixRun.record(loaded.model, calibration)
        table = table or DamageTable(report.n_layers, run.n_seqs, run.n_tokens, run.baseline_nll)
        return cls(loaded, report, run, table, Meter(progress or (lambda _m: None)), constraints)

    def plans(self, budgets: Iterable[int]) -> Iterator[tuple[int, DamageSearch]]:
        """(budget, the plan of least measured damage there) for each budget ascending, saying which budget it is
        and, once measurements have been timed, about how long the rest will take."""
        todo = sorted(set(int(b) for b in budgets))
        for i, budget in enumerate(todo):
            self.meter.say(f"budget {budget} ({i + 1} of {len(todo)}){self._time_left(todo[i:])}")
            yield budget, plan_from_damage(self.loaded, self.report, self.run, budget=budget,
                                           constraints=self.constraints, table=self.table, meter=self.meter)

    def _time_left(self, budgets: list[int]) -> str:
        """An estimate of the time left once the shared pair measurements are made: each budget left costs about its
        size plus two whole measurements (its plan and neighbours checked whole, a span or two re-measured)."""
        if not self.meter.count:
            return ""
        per = self.meter.seconds / self.meter.count
        return f", about {per * sum(b + 2 for b in budgets):.0f} s of measurements left"
