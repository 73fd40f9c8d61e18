"""What the planner's objective does: re-plan from a frontier's saved measurements with next-token NLL change instead
of KL as the damage (or with head maps off), and judge each plan on the same held-out tokens as the frontier.

The frontier's table holds, per pair and span, the per-sequence KL and NLL change, so choosing by NLL change costs
only the measurements the new plans ask for (their deeper anchors, spans and whole-plan checks).

    PYTHONPATH=. python benchmarks/objective_from_table.py --state DIR/frontier --model MODEL --budgets 3,6 \
        --objective nll --align auto --out result.json

`--state`: the folder of a `sa-analyze frontier` run (frontier_state.json and report.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sa_analysis import defaults  # noqa: E402
from sa_analysis.damage.measure import plan_from_damage  # noqa: E402
from sa_analysis.damage.heldout import Untouched, measure_heldout  # noqa: E402
from sa_analysis.damage.prefix import PrefixRun  # noqa: E402
from sa_analysis.planner.record import Damage  # noqa: E402
from sa_analysis.damage.table import DamageTable  # noqa: E402
from sa_analysis.pipeline import ModelSpec, TextSpec  # noqa: E402
from sa_analysis.planner import PlanConstraints  # noqa: E402
from sa_analysis.report import AttentionReport  # noqa: E402
from sa_analysis.search.frontier import heldout_summary  # noqa: E402


class NllAsDamage(PrefixRun):
    """A recorded prefix whose measurements report the NLL change in place of the KL (what the planner minimises)."""

    def damage(self, anchor_of, head_map=None, mode="fast", probe=False):
        measured = super().damage(anchor_of, head_map, mode, probe)
        return Damage(list(measured.nll_change), list(measured.nll_change), measured.top1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--model", default=defaults.MODEL)
    parser.add_argument("--budgets", default="3")
    parser.add_argument("--objective", choices=("kl", "nll"), default="nll")
    parser.add_argument("--align", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    saved = json.loads((args.state / "frontier_state.json").read_text())["table"]
    if args.objective == "nll":
        for group in ("pairs", "spans"):
            for row in saved[group]:
                row["kl"] = list(row["nll_change"])
    table = DamageTable.from_dict(saved)
    report = AttentionReport.load(args.state / "report.json")
    loaded = ModelSpec(args.model).load()
    calibration = TextSpec(None, table.n_seqs, report.seq_len).batch(loaded, "calibration")  # the table's tokens
    recorded = PrefixRun.record(loaded.model, calibration)
    if abs(recorded.baseline_nll - table.baseline_nll) > 1e-6 * abs(table.baseline_nll):
        raise SystemExit("these calibration tokens are not the ones the table was measured on")
    run = recorded if args.objective == "kl" else NllAsDamage(**vars(recorded))
    held = Untouched.record(loaded.model, TextSpec(None, defaults.N_SEQS, report.seq_len).batch(loaded, "heldout"))
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        started = time.perf_counter()
        plan = plan_from_damage(loaded, report, run, budget=budget, table=table,
                                constraints=PlanConstraints(align_heads=args.align)).plan
        measured = heldout_summary(loaded.model, held, plan)
        rows.append({"budget": budget, "followers": plan.followers, "aligned": plan.aligned_followers,
                     "heldout_change": math.expm1(measured.nll_change), "heldout_kl": measured.kl,
                     "heldout_low": math.expm1(measured.nll_change_low), "heldout_high": math.expm1(measured.nll_change_high),
                     "seconds": time.perf_counter() - started})
        print(f"budget {budget}: {plan.spans_spec()} (aligned {plan.aligned_followers}) held-out "
              f"{100 * rows[-1]['heldout_change']:+.1f}% [{100 * rows[-1]['heldout_low']:+.1f}, "
              f"{100 * rows[-1]['heldout_high']:+.1f}], KL {measured.kl:.4f}", flush=True)
    args.out.write_text(json.dumps({"objective": args.objective, "align": args.align, "model": args.model,
                                    "unshared_perplexity": measure_heldout(None, held).untouched_perplexity, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
