"""The frontier job: the recommended plan at each budget, predicted, measured on held-out text, what it saves; with a
heal recipe, each plan healed and judged against the control; frontier.json and frontier.png.

The state (every damage measurement, every point, every heal) is saved under the output folder as it is made
(`frontier_state.json`); `resume=True` goes on from it, so a stopped run loses nothing it had measured.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import defaults
from ..artefact import provenance
from ..errors import UserError
from ..io import json_safe, read_json, write_json
from ..planner import PlanConstraints, SharePlan
from ..prechecks import check_budgets, check_frontier
from ..progress import Say
from ..search.frontier import Frontier, FrontierState, HealedText, measure_frontier
from .heatmap import report_or_measure
from .inputs import CaptureSpec, ModelSpec, Status, TextSpec

if TYPE_CHECKING:
    from ..data import Tokens
    from ..heal.config import HealConfig
    from ..loading import LoadedModel

STATE_FILE = "frontier_state.json"


@dataclass
class FrontierResult:
    frontier: Frontier
    out: Path
    files: list[Path]


def run_frontier(source: ModelSpec, text: TextSpec, capture: CaptureSpec = CaptureSpec(), *,
                 report: str | Path | None = None, budgets: Sequence[int] | None = None,
                 constraints: PlanConstraints = PlanConstraints(), tolerance: float = defaults.TOLERANCE,
                 baselines: Sequence[str] = (), heal_config: "HealConfig | None" = None,
                 heal_data: str | Path | None = None, other_text: str | Path | None = None, control: bool = True,
                 out: Path | None = None, resume: bool = False, progress: Say | None = None,
                 status: Status | None = None) -> FrontierResult:
    """The sharing frontier of `source` over `budgets` (layer counts; default 1 up to half the layers).

    Plans are chosen by measured output damage on calibration tokens of `text` and measured on its held-out part
    (`text.n_seqs` sequences of the report's length; `text.seq_len` None: the analysis default). `heal_config` (a `heal.HealConfig`): each plan is also healed on
    `heal_data` (default: the calibration part of the default text) and judged against the control on the held-out
    part of that data and on `other_text` (`pipeline.heal.heal_evals`). `capture`: how a fresh attention report is
    measured when `report` is None. `baselines` (`choices.BASELINES`): the plans a researcher tries first, chosen on
    the same calibration tokens and judged beside each budget's plan on the same held-out tokens, paired.
    `progress(message)` hears one line per measurement, heal step and budget.
    """
    say = progress or (lambda _m: None)
    check_frontier(source.model if report is None else None, budgets=budgets, baselines=baselines, text=text.text,
                   seq_len=text.seq_len, heal=heal_config is not None, heal_data=heal_data, other_text=other_text)
    started = time.perf_counter()
    att, out_dir, placed, loaded = report_or_measure(report, source, text, capture, out, status=status)
    loaded = loaded or placed.load(status)
    wanted = check_budgets(budgets, n_layers=loaded.info.n_layers)  # the range against the loaded model (a report's, too)
    seq_len = att.seq_len or text.seq_len or defaults.SEQ_LEN
    sized = replace(text, seq_len=seq_len)
    calibration, heldout = sized.damage_batch(loaded), sized.batch(loaded, "heldout")
    state_path = out_dir / STATE_FILE
    key = _state_key(loaded, calibration, heldout, constraints, heal_config, heal_data, other_text)
    state = _resumed(state_path, key, resume, say)
    save = lambda s: write_json(state_path, {"key": key, **s.to_dict()})  # noqa: E731
    state, untouched = measure_frontier(loaded, att, calibration, heldout, wanted, constraints=constraints,
                                        state=state, baselines=baselines, progress=say, on_measured=save)
    baseline = {"nll": untouched.untouched_nll_mean, "perplexity": untouched.untouched_perplexity}
    healing = None
    if heal_config is not None:
        healing = heal_frontier(placed, loaded, state, heal_data, other_text, text, heal_config, control=control,
                                save=save, progress=say, status=status)
    frontier = Frontier(model=loaded.info.shape(), points=[state.points[b] for b in wanted], baseline=baseline,
                        tolerance=tolerance, calibration=calibration.describe(), heldout=heldout.describe(), heal=healing,
                        seconds=round(time.perf_counter() - started, 1), meta=provenance(loaded.info.device))
    return FrontierResult(frontier, out_dir, write_frontier(frontier, out_dir))


def heal_frontier(placed: ModelSpec, loaded: LoadedModel, state: FrontierState, data: str | Path | None,
                  other_text: str | Path | None, text: TextSpec, config: HealConfig, *, control: bool, save: Callable,
                  progress: Say, status: Status | None = None) -> dict[str, Any]:
    """Heal each point's plan from the untouched weights with `config`, judged against the control (cached: one for
    the model and recipe); the results go into each point's `healed` (saved after each heal)."""
    from ..heal import heal, load_heal_data, run_control
    from .heal import heal_evals

    train = load_heal_data(data, loaded.tokenizer, seq_len=config.seq_len,
                           vocab_size=None if loaded.tokenizer else loaded.info.vocab_size,
                           max_examples=config.steps * config.batch_size * config.grad_accum)
    evals = heal_evals(loaded, data, TextSpec(other_text, defaults.HEAL_N_SEQS, config.seq_len))
    found = None
    if control and config.objective == "lm":  # a distilled heal's control is the untouched model itself
        progress("control heal: the unshared model, the same recipe")
        found = run_control(loaded, train, evals, config, on_step=_steps(progress, "control", config.steps))
        progress(f"control: {found['status']}")
    todo = [p for p in state.points.values() if p.healed is None]
    for i, point in enumerate(todo):
        progress(f"healing the plan of budget {point.budget} ({i + 1} of {len(todo)})")
        fresh = placed.load(None)  # the untouched weights: every plan heals from the same start
        report = heal(fresh, SharePlan.from_dict(point.plan), train, evals, config, export=False, control=found,
                      on_step=_steps(progress, f"heal {i + 1} of {len(todo)}", config.steps))
        point.healed = {name: HealedText.of(e["perplexity"], report.gaps(name)) for name, e in report.evals.items()}
        point.healed_run = {"n_trainable": report.run.get("n_trainable"), "seconds": report.run.get("seconds"),
                            "loss_first": report.losses[0] if report.losses else None,
                            "loss_last": report.losses[-1] if report.losses else None}
        save(state)
    return {"config": config.to_dict(), "objective": config.objective, "data": train.describe(),
            "evals": {name: batch.describe() for name, batch in evals.items()},
            "control": None if found is None else {k: found.get(k) for k in ("status", "key", "seconds", "perplexity")}}


def _steps(progress: Say, what: str, total: int) -> Callable[[int, float], None]:
    """A heal's on_step that says every tenth of the steps how far it is, the loss and the time left of this heal."""
    started = time.perf_counter()

    def say(step: int, loss: float) -> None:
        if step % max(1, total // 10) == 0 or step == total:
            left = (time.perf_counter() - started) / step * (total - step)
            progress(f"{what}: step {step}/{total}, loss {loss:.3f}, about {left:.0f} s left of it")

    return say


def write_frontier(frontier: Frontier, out: Path) -> list[Path]:
    """frontier.json and frontier.png under `out`."""
    from ..plots import plot_frontier

    return [frontier.save(out / "frontier.json")] + plot_frontier(frontier, out / "frontier")


def _state_key(loaded: LoadedModel, calibration: Tokens, heldout: Tokens, constraints: PlanConstraints, heal_config: HealConfig,
               heal_data: Any, other_text: Any) -> str:
    """What a saved state must have been made with to be resumed: the weights, the tokens, the constraints, the heal."""
    from ..heal import weights_fingerprint

    made = {"weights": weights_fingerprint(loaded.model), "calibration": calibration.describe(),
            "heldout": heldout.describe(), "constraints": constraints.as_kwargs(),
            "heal": None if heal_config is None else heal_config.to_dict(), "heal_data": str(heal_data),
            "other_text": str(other_text)}
    return hashlib.sha1(json.dumps(json_safe(made), sort_keys=True).encode()).hexdigest()[:20]


def _resumed(path: Path, key: str, resume: bool, say: Say) -> FrontierState | None:
    """The saved state to go on from (None: start afresh); one made with other inputs is refused."""
    if not resume:
        return None
    if not path.is_file():
        say("resume asked but no saved state was found; starting afresh")
        return None
    saved = read_json(path, "frontier state")
    if saved.get("key") != key:
        raise UserError(f"The saved frontier in {path} was made with another model, text, constraints or heal recipe; "
                        f"resume with the same options, or start afresh without --resume (or in another --out).")
    state = FrontierState.from_dict(saved)
    say(f"resumed: {len(state.table.pairs)} pair and {len(state.table.spans)} span measurements, "
        f"{len(state.points)} budget(s) done")
    return state
