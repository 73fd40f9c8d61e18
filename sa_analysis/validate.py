"""Validate: prove a Shared Attention plan by measurement, baseline vs patched, in one `ValidationReport`.

Quality on held-out text (never the calibration text the plan was chosen on): perplexity and its relative change,
next-token KL(baseline || patched), top-1 agreement, and a pass/fail against a tolerance on the relative
perplexity increase. Optionally lm-evaluation-harness tasks (`HFLM` wrapping the patched model object; local task
files, offline). Efficiency, measured: prefill and decode tokens/s, peak memory and KV-cache bytes.

`search_plans` closes the loop of DESIGN.md section 4: it measures each layer's real quality loss when shared
alone (its *sensitivity*), feeds that back to the planner, measures the candidate plans it proposes, and returns
the best plan within the tolerance, with a table of everything tried.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import compat
from .errors import UserError
from .io import atomic_write, read_json, write_json
from .patch import MODES, cache_bytes, plan_anchors, share_attention

REPORT_FORMAT = "sa-analysis/validation-report"
SEARCH_FORMAT = "sa-analysis/plan-search"
FORMAT_VERSION = 1
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TOLERANCE = 0.05


# ======================================================================================================
# The report
# ======================================================================================================
@dataclass
class ValidationReport:
    """Baseline vs patched on held-out text: quality, pass/fail, measured speed and memory, optional tasks."""

    model: dict[str, Any]
    plan: dict[str, Any]
    mode: str
    tolerance: float
    data: dict[str, Any]
    quality: dict[str, float]  # ppl_baseline, ppl_patched, ppl_change, nll_*, kl_mean, top1_agreement, n_tokens
    passed: bool
    speed: dict[str, Any] | None = None
    predicted: dict[str, Any] | None = None
    tasks: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl_change(self) -> float:
        return float(self.quality["ppl_change"])

    def summary(self) -> str:
        """One line: the verdict and the numbers behind it."""
        q = self.quality
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict}: perplexity {q['ppl_baseline']:.4g} -> {q['ppl_patched']:.4g} ({100 * q['ppl_change']:+.2f}%, "
                f"tolerance {100 * self.tolerance:.2f}%), next-token KL {q['kl_mean']:.4g} nats, "
                f"top-1 agreement {100 * q['top1_agreement']:.1f}%")

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "version": FORMAT_VERSION, **_json_safe(asdict(self))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "validation report") -> "ValidationReport":
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
            raise UserError(f"{source} is not an sa-analysis validation report; pass a validation.json written by `sa-analyze validate`.")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise UserError(f"{source} is a damaged validation report ({exc}); re-run `sa-analyze validate`.") from None

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ValidationReport":
        return cls.from_dict(read_json(path, "validation report"), source=str(path))


# ======================================================================================================
# Plans
# ======================================================================================================
def as_plan(plan: Any, n_layers: int, model: Mapping[str, Any] | None = None):
    """A planner `SharePlan` from a SharePlan, a `{follower: anchor}` mapping, or a spans string ("23-26,28-30")."""
    from .planner import SharePlan

    if isinstance(plan, str):
        return SharePlan.from_spans(plan, n_layers, model=dict(model or {}))
    anchor_of = plan_anchors(plan, n_layers)  # checks the SA semantics and the layer count
    if isinstance(plan, SharePlan):
        return plan
    return SharePlan(n_layers=n_layers, followers=sorted(anchor_of), model=dict(model or {}))


def check_plan_for_model(plan: Any, info: Any) -> None:
    """A plan made for another model (layer count, shape or name) is a user error, said in one sentence."""
    shape = getattr(plan, "model", None) or {}
    if int(getattr(plan, "n_layers", info.n_layers)) != info.n_layers:
        raise UserError(f"The plan is for a {plan.n_layers}-layer model but {info.name} has {info.n_layers} layers; use a plan made for this model.")
    for key in ("n_heads", "n_kv_heads", "head_dim", "hidden_size"):
        if shape.get(key) is not None and int(shape[key]) != int(getattr(info, key)):
            raise UserError(f"The plan's model has {key}={shape[key]} but {info.name} has {getattr(info, key)}; use a plan made for this model.")
    name = shape.get("name")
    if name and info.name and str(name).lower() != str(info.name).lower():
        raise UserError(f"The plan was made for {name} but the model is {info.name}; pass --model {name} or a plan made for this model.")


def _model_shape(info: Any) -> dict[str, Any]:
    return {"name": info.name, "n_layers": info.n_layers, "n_heads": info.n_heads, "n_kv_heads": info.n_kv_heads,
            "head_dim": info.head_dim, "hidden_size": info.hidden_size}


def predicted_savings(plan: Any, info: Any, context_len: int) -> dict[str, Any] | None:
    """The planner's predicted savings for this model's shape at `context_len` (None for plans without them)."""
    if not hasattr(plan, "savings"):
        return None
    from .planner import SharePlan

    model = dict(plan.model)
    for key, value in _model_shape(info).items():
        if model.get(key) is None:
            model[key] = value
    shaped = SharePlan(n_layers=plan.n_layers, followers=list(plan.followers), model=model)
    bytes_per_element = torch.finfo(_dtype_of(info.dtype)).bits // 8
    return shaped.savings(context_len=context_len, bytes_per_element=bytes_per_element)


def _dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name, torch.float32)


# ======================================================================================================
# Quality
# ======================================================================================================
@dataclass
class Baseline:
    """The unpatched model's next-token log-probabilities, computed once and compared with every patched run."""

    input_ids: torch.Tensor  # [S, T] on the model's device
    log_probs: list[torch.Tensor]  # per micro-batch [b, T-1, V] float32
    batch_size: int


def _ids(batch: Any) -> torch.Tensor:
    """[S, T] token ids from a TokenBatch or a tensor."""
    ids = batch.input_ids if hasattr(batch, "input_ids") else batch
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError("Validation needs token ids of shape [sequences, tokens] with at least 2 tokens per sequence.")
    return ids


def _device(model: torch.nn.Module) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.inference_mode()
def _next_token_log_probs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, T-1, V] float32 log-probabilities of the next token at every position but the last."""
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # [b, T-1, V]
    return torch.log_softmax(logits.float(), dim=-1)


def baseline(model: torch.nn.Module, batch: Any, batch_size: int = 4) -> Baseline:
    """Run the unpatched model over `batch` in micro-batches of `batch_size` sequences."""
    ids = _ids(batch).to(_device(model))
    chunks = [_next_token_log_probs(model, ids[i:i + batch_size]) for i in range(0, ids.shape[0], batch_size)]
    return Baseline(ids, chunks, batch_size)


def compare_log_probs(base: torch.Tensor, patched: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over tokens: NLL of both, KL(base || patched), top-1 agreement. `base`/`patched` [b, T-1, V], `targets` [b, T-1]."""
    nll_base = -base.gather(-1, targets[..., None]).sum()
    nll_patched = -patched.gather(-1, targets[..., None]).sum()
    kl = (base.exp() * (base - patched)).sum(-1)  # [b, T-1]
    agree = (base.argmax(-1) == patched.argmax(-1)).sum()
    return {"nll_baseline": float(nll_base), "nll_patched": float(nll_patched), "kl": float(kl.sum()),
            "kl_max": float(kl.max()), "agree": float(agree), "n_tokens": int(targets.numel())}


def measure_quality(model: torch.nn.Module, plan: Any, base: Baseline, mode: str = "fast") -> dict[str, float]:
    """Patched vs baseline on the baseline's tokens: perplexities, relative change, mean KL, top-1 agreement."""
    totals: dict[str, float] = {}
    with share_attention(model, plan, mode=mode):
        for i, base_lp in enumerate(base.log_probs):
            ids = base.input_ids[i * base.batch_size:(i + 1) * base.batch_size]
            sums = compare_log_probs(base_lp, _next_token_log_probs(model, ids), ids[:, 1:])
            kl_max = max(totals.get("kl_max", 0.0), sums.pop("kl_max"))
            totals = {k: totals.get(k, 0) + v for k, v in sums.items()}
            totals["kl_max"] = kl_max
    n = totals["n_tokens"]
    nll_b, nll_p = totals["nll_baseline"] / n, totals["nll_patched"] / n
    return {"ppl_baseline": math.exp(nll_b), "ppl_patched": math.exp(nll_p), "ppl_change": math.expm1(nll_p - nll_b),
            "nll_baseline": nll_b, "nll_patched": nll_p, "kl_mean": totals["kl"] / n, "kl_max": totals["kl_max"],
            "top1_agreement": totals["agree"] / n, "n_tokens": int(n)}


# ======================================================================================================
# Speed and memory
# ======================================================================================================
class _Timer:
    """Seconds taken by a callable: CUDA events on a GPU (after synchronising), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if not self.cuda:
            start = time.perf_counter()
            result = fn()
            return time.perf_counter() - start, result
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1000.0, result

    @property
    def name(self) -> str:
        return "cuda-events" if self.cuda else "perf_counter"


@torch.inference_mode()
def _prefill(model: torch.nn.Module, prompt: torch.Tensor):
    """Run the prompt `[B, T]` into a new cache; returns (cache, next token [B, 1])."""
    cache = compat.new_cache(model)  # built from the (possibly patched) config
    out = model(input_ids=prompt, **compat.cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1:].argmax(-1)


@torch.inference_mode()
def _decode(model: torch.nn.Module, cache: Any, token: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy decoding of `n_new` tokens, one forward per token, on an existing cache."""
    cache_kwargs = compat.cache_kwargs(model, cache)  # read the keyword once, outside the timed loop
    for _ in range(n_new):
        out = model(input_ids=token, **cache_kwargs, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def _round(model: torch.nn.Module, prompt: torch.Tensor, n_new: int, timer: _Timer) -> tuple[float, float]:
    """One timed prefill of `prompt` [B, T] and `n_new` greedy decode steps on its cache: (prefill s, decode s)."""
    t_pre, (cache, token) = timer(lambda: _prefill(model, prompt))
    t_dec = timer(lambda: _decode(model, cache, token, n_new))[0] if n_new else 0.0
    return t_pre, t_dec


def _summarise(times: list[tuple[float, float]], prompt: torch.Tensor, n_new: int, timer: _Timer) -> dict[str, Any]:
    batch, length = prompt.shape
    t_pre = statistics.median(t for t, _ in times)
    t_dec = statistics.median(t for _, t in times)
    return {"batch": int(batch), "prompt_len": int(length), "n_new": int(n_new), "repeats": len(times),
            "timer": timer.name, "prefill_s": t_pre, "decode_s": t_dec,
            "prefill_tokens_per_s": batch * length / t_pre if t_pre > 0 else None,
            "decode_tokens_per_s": batch * n_new / t_dec if n_new and t_dec > 0 else None}


def _memory(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> dict[str, Any]:
    """KV-cache bytes after a prefill (summed over the cache's tensors) and peak memory (CUDA only)."""
    cache, _ = _prefill(model, prompt)
    kv = cache_bytes(cache)
    del cache
    return {"kv_cache_bytes": kv["total"], "k_cache_bytes": kv["keys"], "v_cache_bytes": kv["values"],
            "peak_memory_bytes": _peak_memory(model, prompt, n_new)}


def measure_speed(model: torch.nn.Module, prompt: torch.Tensor, n_new: int = 32, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Prefill and decode throughput of the model as it is now (median of `repeats` after `warmup` rounds), KV bytes, peak memory.

    `prompt` [B, T]. Prefill tokens/s = B*T / prefill time; decode tokens/s = B*n_new / time of n_new greedy steps
    on the prefilled cache. Timing: CUDA events after synchronising on a GPU, perf_counter on the CPU.
    """
    prompt = prompt.to(_device(model))
    timer = _Timer(prompt.device)
    times = [_round(model, prompt, n_new, timer) for _ in range(warmup + repeats)][warmup:]
    return {**_summarise(times, prompt, n_new, timer), **_memory(model, prompt, n_new)}


def _peak_memory(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> int | None:
    """CUDA: peak allocated bytes over one prefill + decode (weights included). CPU: None (not measured)."""
    device = _device(model)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    cache, token = _prefill(model, prompt)
    _decode(model, cache, token, n_new)
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def compare_speed(model: torch.nn.Module, plan: Any, prompt: torch.Tensor, mode: str = "fast", n_new: int = 32,
                  warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Baseline and patched speed and memory on the same prompt, with patched / baseline ratios.

    Rounds alternate baseline, patched, baseline, ... so that drift (clocks, other processes) hits both alike.
    """
    prompt = prompt.to(_device(model))
    timer = _Timer(prompt.device)
    times: dict[str, list[tuple[float, float]]] = {"baseline": [], "patched": []}
    for i in range(warmup + repeats):
        for name in times:
            with share_attention(model, plan, mode=mode) if name == "patched" else contextlib.nullcontext():
                sample = _round(model, prompt, n_new, timer)
            if i >= warmup:
                times[name].append(sample)
    base = {**_summarise(times["baseline"], prompt, n_new, timer), **_memory(model, prompt, n_new)}
    with share_attention(model, plan, mode=mode):
        patched = {**_summarise(times["patched"], prompt, n_new, timer), **_memory(model, prompt, n_new)}
    ratio = {key: _ratio(patched[key], base[key]) for key in
             ("prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache_bytes", "k_cache_bytes", "peak_memory_bytes")}
    note = None if base["peak_memory_bytes"] is not None else "peak memory is measured on CUDA only (None on the CPU)"
    return {"baseline": base, "patched": patched, "ratio": ratio, "warmup": warmup, "peak_memory_note": note}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ======================================================================================================
# Downstream tasks (lm-evaluation-harness)
# ======================================================================================================
def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise UserError("Downstream tasks need lm-evaluation-harness; install it with `pip install lm-eval` (or `pip install sa-analysis[eval]`).") from None


def _task_names_and_paths(tasks: Iterable[str]) -> tuple[list[str], list[str]]:
    """Task names for lm-eval and extra include paths: a YAML file or folder given as a task adds its folder."""
    names, paths = [], [str(TASKS_DIR)]
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            import yaml

            config = yaml.load(path.read_text(), Loader=_yaml_loader())
            if not isinstance(config, dict) or "task" not in config:
                raise UserError(f"The task file {path} has no `task:` name; pass an lm-evaluation-harness task YAML.")
            names.append(str(config["task"]))
            paths.append(str(path.parent.resolve()))
        elif path.is_dir():
            raise UserError(f"{path} is a folder; pass a task YAML file inside it (or its task name).")
        else:
            names.append(task)
    return names, paths


def _yaml_loader():
    """A YAML loader that reads lm-eval's `!function` tags as plain strings (we only need the task name)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], names: tuple[str, ...]):
    """An lm-eval TaskManager that knows `names`: local folders only when they suffice (indexing lm-eval's own
    thousands of task files takes seconds), else the built-in tasks too."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(paths), include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=list(paths))
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"Unknown lm-eval task(s) {', '.join(unknown)}; use a task name (e.g. sa_tiny_mc) or a path to a task YAML.")
    return manager


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The lm-eval task names for `tasks` (names or YAML paths), checked before any model time is spent."""
    _require_lm_eval()
    names, paths = _task_names_and_paths(tasks)
    _task_manager(tuple(paths), tuple(names))
    return names


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness tasks on the model object as it is now (patched or not): {task: {metric: value}}.

    Local tasks (the shipped `sa_tiny_mc`, or YAML files given by path) run offline.
    """
    _require_lm_eval()
    if tokenizer is None:
        from .data import default_tokenizer

        tokenizer = default_tokenizer()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, paths = _task_names_and_paths(tasks)
    manager = _task_manager(tuple(paths), tuple(names))
    lm_logger = logging.getLogger("lm_eval")
    level = lm_logger.level
    lm_logger.setLevel(logging.ERROR)  # its warnings about a model object passed as `pretrained` are expected
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False)["results"]
    finally:
        lm_logger.setLevel(level)
    return {task: {key.split(",")[0]: float(value) for key, value in metrics.items()
                   if isinstance(value, (int, float)) and "stderr" not in key}
            for task, metrics in results.items()}


def compare_tasks(model: torch.nn.Module, tokenizer: Any, plan: Any, tasks: Sequence[str], mode: str = "fast",
                  limit: int | None = None) -> dict[str, Any]:
    """The tasks on the baseline and the patched model: {"baseline": ..., "patched": ..., "change": ...}."""
    base = run_tasks(model, tokenizer, tasks, limit=limit)
    with share_attention(model, plan, mode=mode):
        patched = run_tasks(model, tokenizer, tasks, limit=limit)
    change = {task: {m: patched[task][m] - v for m, v in metrics.items() if m in patched.get(task, {})}
              for task, metrics in base.items()}
    return {"baseline": base, "patched": patched, "change": change, "limit": limit}


# ======================================================================================================
# validate_plan
# ======================================================================================================
def validate_plan(
    loaded: Any,
    plan: Any,
    batch: Any,
    *,
    mode: str = "fast",
    tolerance: float = DEFAULT_TOLERANCE,
    tasks: Sequence[str] | None = None,
    task_limit: int | None = None,
    measure_speed: bool = True,
    speed_batch: int | None = None,
    speed_new_tokens: int = 32,
    speed_repeats: int = 3,
    batch_size: int = 4,
    baseline_outputs: Baseline | None = None,
) -> ValidationReport:
    """Baseline vs patched on the held-out `batch` (a TokenBatch of split "heldout", or ids [S, T]).

    `plan`: a SharePlan, `{follower: anchor}`, or a spans string. Passes when the relative perplexity increase is
    at most `tolerance`. Speed uses the first `speed_batch` sequences (default: all, at most 8) as the prompt.
    """
    if isinstance(getattr(batch, "split", None), str) and batch.split != "heldout":
        raise UserError("Validation must run on held-out text, never the calibration text the plan was chosen on; use split='heldout'.")
    _check_options(mode, tolerance)
    if tasks:
        check_tasks(tasks)
    model, info = loaded.model, loaded.info
    share_plan = as_plan(plan, info.n_layers, _model_shape(info))
    check_plan_for_model(share_plan, info)
    base = baseline_outputs or baseline(model, batch, batch_size)
    quality = measure_quality(model, share_plan, base, mode)
    ids = _ids(batch)
    speed = None
    if measure_speed:
        prompt = ids[: speed_batch or min(ids.shape[0], 8)]
        speed = compare_speed(model, share_plan, prompt, mode, speed_new_tokens, repeats=speed_repeats)
    task_results = compare_tasks(model, loaded.tokenizer, share_plan, tasks, mode, task_limit) if tasks else None
    return ValidationReport(
        model=info.to_dict(), plan=share_plan.to_dict(), mode=mode, tolerance=float(tolerance),
        data=batch.describe() if hasattr(batch, "describe") else {"n_seqs": ids.shape[0], "seq_len": ids.shape[1]},
        quality=quality, passed=bool(quality["ppl_change"] <= tolerance), speed=speed,
        predicted=predicted_savings(share_plan, info, ids.shape[1]), tasks=task_results, meta=_meta(model),
    )


def _check_options(mode: str, tolerance: float) -> None:
    if mode not in MODES:
        raise UserError(f"Unknown Shared Attention mode {mode!r}; use fast or exact.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
        raise UserError(f"The tolerance must be a number >= 0 (a relative perplexity increase, e.g. 0.05); got {tolerance!r}.")


def _meta(model: torch.nn.Module) -> dict[str, Any]:
    import transformers

    device = _device(model)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


# ======================================================================================================
# search_plans: plan -> validate -> re-plan
# ======================================================================================================
@dataclass
class PlanSearch:
    """What `search_plans` tried and chose: every measured plan, the sensitivity it fed back, the final check."""

    tolerance: float
    mode: str
    rows: list[dict[str, Any]]  # one per plan measured on the calibration text
    sensitivity: dict[int, float]  # follower -> next-token KL (nats) when shared alone
    best: dict[str, Any] | None  # the chosen plan (SharePlan.to_dict()), None when nothing passes
    validation: ValidationReport | None  # the chosen plan re-checked on held-out text
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_plan(self):
        from .planner import SharePlan

        return None if self.best is None else SharePlan.from_dict(self.best)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({"format": SEARCH_FORMAT, "version": FORMAT_VERSION, "tolerance": self.tolerance,
                           "mode": self.mode, "rows": self.rows,
                           "sensitivity": {str(k): v for k, v in self.sensitivity.items()}, "best": self.best,
                           "validation": None if self.validation is None else self.validation.to_dict(),
                           "meta": self.meta})

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PlanSearch":
        data = read_json(path, "plan search")
        if not isinstance(data, dict) or data.get("format") != SEARCH_FORMAT:
            raise UserError(f"{path} is not an sa-analysis plan search; pass a search.json written by sa-analyze.")
        validation = data.get("validation")
        return cls(tolerance=data["tolerance"], mode=data["mode"], rows=data["rows"],
                   sensitivity={int(k): v for k, v in data["sensitivity"].items()}, best=data["best"],
                   validation=None if validation is None else ValidationReport.from_dict(validation), meta=data.get("meta", {}))


def measure_sensitivity(model: torch.nn.Module, base: Baseline, layers: Iterable[int], mode: str = "fast",
                        progress: Callable[[str], None] | None = None) -> dict[int, dict[str, float]]:
    """Each layer shared alone (with the layer before it as anchor): its measured quality on the baseline's text."""
    out = {}
    for layer in layers:
        out[layer] = measure_quality(model, {layer: layer - 1}, base, mode)
        if progress:
            progress(f"sensitivity: layer {layer} alone -> {100 * out[layer]['ppl_change']:+.2f}% perplexity")
    return out


def _sensitivity_weight(costs, sensitivity: Mapping[int, float]) -> float:
    """Scale that puts measured sensitivity on the cost's scale: median adjacent cost / median sensitivity."""
    import numpy as np

    adjacent = [float(costs[m, m - 1]) for m in sensitivity if np.isfinite(costs[m, m - 1])]
    sens = [v for v in sensitivity.values() if v > 0]
    if not adjacent or not sens:
        return 1.0
    scale = statistics.median(adjacent) / statistics.median(sens)
    return scale if math.isfinite(scale) and scale > 0 else 1.0


def candidate_plans(report: Any, budget: int, sensitivity: Mapping[int, float], cost: str = "kl",
                    constraints: Mapping[str, Any] | None = None,
                    nll_change: Mapping[int, float] | None = None) -> dict[str, Any]:
    """The planner's plans for one budget, from the similarity prior and the measured single-layer losses.

    {method: SharePlan} for
      - "similarity": the report's cost alone;
      - "similarity+sensitivity": cost + measured next-token KL per follower, medians matched so neither drowns;
      - "sensitivity": the measured next-token KL alone (sum over followers);
      - "perplexity": the measured NLL change alone (sum over followers; only when `nll_change` is given).
    A variant the constraints make impossible is left out.
    """
    from . import planner

    constraints = dict(constraints or {})
    costs = planner.cost_matrix(report, cost)
    weight = _sensitivity_weight(costs, sensitivity)
    variants = {
        "similarity": dict(),
        "similarity+sensitivity": dict(sensitivity=dict(sensitivity), sensitivity_weight=weight),
        "sensitivity": dict(sensitivity=dict(sensitivity), sensitivity_mode="replace"),
    }
    if nll_change:
        variants["perplexity"] = dict(sensitivity=dict(nll_change), sensitivity_mode="replace")
    plans = {}
    for method, kwargs in variants.items():
        try:
            plans[method] = planner.plan_spans(report, budget=budget, cost=cost, **constraints, **kwargs)
        except UserError:
            continue
    return plans


def search_plans(
    loaded: Any,
    report: Any,
    calibration: Any,
    heldout: Any,
    *,
    budgets: Sequence[int] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    mode: str = "fast",
    cost: str = "kl",
    first_shareable: int = 1,
    keep: Iterable[int] = (),
    max_span: int | None = None,
    batch_size: int = 4,
    measure_speed: bool = False,
    tasks: Sequence[str] | None = None,
    stop_early: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PlanSearch:
    """Find the plan sharing the most layers within `tolerance`, by measurement.

    1. Sensitivity: every shareable layer shared alone, measured on the calibration text (next-token KL and NLL
       change, nats).
    2. For each budget in increasing order (default 1, 2, ... up to what the constraints allow), the planner
       proposes plans (`candidate_plans`: by similarity, similarity + sensitivity, sensitivity alone, perplexity
       change alone); each is measured on the calibration text. With `stop_early`, the first budget with no candidate within tolerance ends the search.
    3. The best passing plan (most layers shared, then least next-token KL) is validated on the held-out text.
    The choice is made on calibration text and checked on held-out text, so the final numbers are not selected on.
    """
    from . import planner

    if report.n_layers != loaded.info.n_layers:
        raise UserError(f"The report is for a {report.n_layers}-layer model but {loaded.info.name} has {loaded.info.n_layers} layers; use this model's report.")
    _check_options(mode, tolerance)
    say = progress or (lambda _msg: None)
    model = loaded.model
    constraints = dict(first_shareable=first_shareable, keep=list(keep), max_span=max_span)
    mask = planner.shareable_mask(report.n_layers, first_shareable, keep)
    base = baseline(model, calibration, batch_size)

    singles = measure_sensitivity(model, base, [m for m in range(report.n_layers) if mask[m]], mode, say)
    sensitivity = {m: max(q["kl_mean"], 0.0) for m, q in singles.items()}
    nll_change = {m: q["nll_patched"] - q["nll_baseline"] for m, q in singles.items()}
    rows = [_row("sensitivity", "single layer", planner.SharePlan(report.n_layers, [m]), q, tolerance)
            for m, q in singles.items()]

    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    proposed: dict[tuple[int, ...], Any] = {}  # the planner's plan for each measured follower set
    limit = planner.max_followers(mask, max_span)
    for budget in sorted(int(b) for b in budgets) if budgets else range(1, limit + 1):
        passed_any = False
        for method, plan in candidate_plans(report, int(budget), sensitivity, cost, constraints, nll_change).items():
            key = tuple(plan.followers)
            if key in seen:
                seen[key]["methods"].append(method)
                passed_any |= seen[key]["passed"]
                continue
            quality = singles[key[0]] if len(key) == 1 else measure_quality(model, plan, base, mode)
            row = _row("candidate", method, plan, quality, tolerance)
            row["methods"] = [method]
            seen[key] = row
            proposed[key] = plan
            rows.append(row)
            passed_any |= row["passed"]
            say(f"budget {budget}: {method} {plan.spans_spec() or '-'} -> {100 * quality['ppl_change']:+.2f}%")
        if stop_early and not passed_any:
            break

    best_row = _choose(rows)
    best_plan = None if best_row is None else _chosen_plan(best_row, proposed.get(tuple(best_row["followers"])), loaded.info)
    validation = None
    if best_plan is not None:
        say(f"validating {best_plan.spans_spec()} on held-out text")
        validation = validate_plan(loaded, best_plan, heldout, mode=mode, tolerance=tolerance, tasks=tasks,
                                   measure_speed=measure_speed, batch_size=batch_size)
    return PlanSearch(tolerance=float(tolerance), mode=mode, rows=rows, sensitivity=sensitivity,
                      best=None if best_plan is None else best_plan.to_dict(), validation=validation,
                      meta={"calibration": _describe(calibration), "heldout": _describe(heldout), "cost": cost,
                            "constraints": constraints, "budgets": list(budgets) if budgets else None})


def _chosen_plan(row: Mapping[str, Any], proposed: Any, info: Any):
    """The chosen plan, for this model's shape, keeping the planner's predicted costs when it proposed it."""
    from .planner import SharePlan

    if proposed is None:
        return SharePlan(info.n_layers, list(row["followers"]), model=_model_shape(info), method="validated")
    return SharePlan(info.n_layers, list(row["followers"]), model=_model_shape(info),
                     method="validated: " + ", ".join(row.get("methods", [row["method"]])),
                     cost_name=proposed.cost_name, follower_costs=proposed.follower_costs,
                     constraints=dict(proposed.constraints), context_len=proposed.context_len)


def _row(stage: str, method: str, plan: Any, quality: Mapping[str, float], tolerance: float) -> dict[str, Any]:
    return {"stage": stage, "method": method, "n_shared": plan.n_shared, "spans": plan.spans_spec(),
            "followers": list(plan.followers), "predicted_cost": getattr(plan, "total_cost", None),
            "ppl_change": quality["ppl_change"], "kl_mean": quality["kl_mean"],
            "top1_agreement": quality["top1_agreement"], "passed": bool(quality["ppl_change"] <= tolerance)}


def _choose(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The passing row with the most layers shared, then the least next-token KL.

    KL, not the perplexity change, ranks plans that pass: on a few thousand calibration tokens the perplexity change
    is noisy (it often comes out negative) and choosing its minimum picks noise; KL(baseline || patched) is a
    lower-variance measure of how far the patched model moved (on SmolLM2-135M it picked the better plan on held-out text).
    """
    passing = [r for r in rows if r["passed"] and r["n_shared"] > 0]
    if not passing:
        return None
    return min(passing, key=lambda r: (-r["n_shared"], r["kl_mean"], r["ppl_change"]))


def _describe(batch: Any) -> dict[str, Any]:
    return batch.describe() if hasattr(batch, "describe") else {"shape": list(_ids(batch).shape)}


# ======================================================================================================
# Figure
# ======================================================================================================
def plot_search(search: PlanSearch, path: str | Path) -> Path:
    """Quality change (% perplexity, calibration text) vs layers shared for every plan tried, with the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"single layer": dict(color="0.6", marker=".", s=30), "similarity": dict(color="tab:blue", marker="o", s=40),
              "similarity+sensitivity": dict(color="tab:green", marker="s", s=40),
              "sensitivity": dict(color="tab:orange", marker="^", s=40),
              "perplexity": dict(color="tab:purple", marker="v", s=40)}
    for method, style in styles.items():
        rows = [r for r in search.rows if r["method"] == method]
        if rows:
            ax.scatter([r["n_shared"] for r in rows], [100 * r["ppl_change"] for r in rows], label=method, **style)
    ax.axhline(100 * search.tolerance, color="tab:red", linestyle="--", linewidth=1, label=f"tolerance {100 * search.tolerance:g}%")
    if search.best is not None:
        best = next(r for r in search.rows if r["followers"] == search.best["followers"])
        ax.scatter([best["n_shared"]], [100 * best["ppl_change"]], marker="*", s=220, facecolor="none",
                   edgecolor="black", linewidth=1.2, label=f"chosen: {best['spans']}")
    if search.validation is not None:
        held = search.validation
        ax.scatter([len(held.plan["followers"])], [100 * held.ppl_change], marker="D", s=60, facecolor="none",
                   edgecolor="black", linewidth=1.2, label="chosen, on held-out text")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layers shared")
    ax.set_yscale("symlog", linthresh=10)  # linear near the tolerance, logarithmic for the large losses
    low, high = ax.get_ylim()
    ticks = [t for t in (-50, -20, -10, -5, 0, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_ylabel("perplexity change (%, log scale above 10)")
    ax.set_title("Shared Attention plans tried (calibration text)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


# ======================================================================================================
# helpers
# ======================================================================================================
def _json_safe(value: Any) -> Any:
    """Plain JSON: dict keys as strings, inf/NaN as strings/None, tensors and numpy scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())
    return value


__all__ = [
    "Baseline", "PlanSearch", "ValidationReport", "as_plan", "baseline", "candidate_plans", "check_plan_for_model",
    "check_tasks", "compare_log_probs", "compare_speed", "compare_tasks", "measure_quality", "measure_sensitivity", "measure_speed",
    "plot_search", "predicted_savings", "run_tasks", "search_plans", "validate_plan",
]
