import sys, time
sys.path.insert(0, "/work/main")
from pathlib import Path
from sa_analysis import defaults
defaults.DAMAGE_TOKENS = 4096
from sa_analysis.pipeline import ModelSpec, TextSpec, run_frontier
t = time.time()
r = run_frontier(ModelSpec(), TextSpec(None, defaults.N_SEQS, None), budgets="3,8", out=Path("/tmp/f4096"),
                 progress=lambda m: print(f"[{time.time()-t:5.0f}] {m}", flush=True))
import math
for p in r.frontier.points:
    print("KL@4096", p.budget, p.plan["followers"], "held %+.1f%%" % (100 * math.expm1(p.heldout.nll_change)),
          "cal NLL %+.1f%%" % (100 * math.expm1(p.predicted.nll_change)), flush=True)
