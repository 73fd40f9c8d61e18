"""Downstream tasks: the built-in ones (`BUILTIN_TASKS`: passkey retrieval at long context, no extra package) and
any lm-evaluation-harness task (`HFLM` wrapping the model object; local task files offline)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..errors import UserError
from ..patch import share_attention

if TYPE_CHECKING:
    from ..planner.plan import PlanLike

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"  # the shipped offline tasks (sa_tiny_mc)


def _passkey(model: torch.nn.Module, tokenizer: Any, limit: int | None, longest: int | None) -> dict[str, float]:
    from .passkey import run_passkey

    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return run_passkey(model, tokenizer, min(longest, context or longest) if longest else context, limit)


BUILTIN_TASKS = {"passkey": _passkey}  # name -> run(model, tokenizer, limit, longest) -> {metric: value}; no lm-eval


def _builtin_name(task: str) -> tuple[str, int | None] | None:
    """("passkey", 4096) for "passkey@4096" (prompts up to that length), ("passkey", None) for "passkey", else None."""
    name, _, longest = task.partition("@")
    if name not in BUILTIN_TASKS:
        return None
    if longest and not (longest.isdigit() and int(longest) >= 256):
        raise UserError(f"Could not read the task {task!r}; write {name} or {name}@N with N >= 256 tokens, e.g. {name}@4096.")
    return name, int(longest) if longest else None


def _split_builtin(tasks: Iterable[str]) -> tuple[list[str], list[str]]:
    """(built-in task names, the rest for lm-eval); a near miss of a built-in name is refused with its spelling."""
    import difflib

    builtin, others = [], []
    for task in tasks:
        if _builtin_name(task) is not None:
            builtin.append(task)
            continue
        close = difflib.get_close_matches(task.lower(), list(BUILTIN_TASKS), n=1, cutoff=0.75)
        if close and not Path(task).suffix:
            raise UserError(f"Unknown task {task!r}; did you mean {close[0]}?")
        others.append(task)
    return builtin, others


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
    """The task names for `tasks` (built-in names, lm-eval names or YAML paths), checked before any model time is
    spent; lm-eval is only needed (and indexed) for tasks that are not built in."""
    builtin, others = _split_builtin(tasks)
    if not others:
        return builtin
    _require_lm_eval()
    names, paths = _task_names_and_paths(others)
    _task_manager(tuple(paths), tuple(names))
    return builtin + names


def run_tasks(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
              batch_size: int = 8) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness tasks on the model object as it is now (patched or not): {task: {metric: value}}.

    Built-in tasks (passkey) and local lm-eval tasks (the shipped `sa_tiny_mc`, or YAML files given by path) run
    offline. `limit`: examples per lm-eval task, prompts per (length, depth) for passkey.
    """
    if tokenizer is None:
        from ..data import default_tokenizer

        tokenizer = default_tokenizer()
    builtin, others = _split_builtin(tasks)
    results = {}
    for task in builtin:
        name, longest = _builtin_name(task)
        results[task] = BUILTIN_TASKS[name](model, tokenizer, limit, longest)
    if others:
        results.update(_run_lm_eval(model, tokenizer, others, limit, batch_size))
    return results


def _run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: Sequence[str], limit: int | None,
                 batch_size: int) -> dict[str, dict[str, float]]:
    _require_lm_eval()
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


def compare_tasks(model: torch.nn.Module, tokenizer: Any, plan: PlanLike, tasks: Sequence[str], mode: str = "fast",
                  limit: int | None = None) -> dict[str, Any]:
    """The tasks on the baseline and the patched model: {"baseline": ..., "patched": ..., "change": ...}."""
    base = run_tasks(model, tokenizer, tasks, limit=limit)
    with share_attention(model, plan, mode=mode):
        patched = run_tasks(model, tokenizer, tasks, limit=limit)
    change = {task: {m: patched[task][m] - v for m, v in metrics.items() if m in patched.get(task, {})}
              for task, metrics in base.items()}
    return {"baseline": base, "patched": patched, "change": change, "limit": limit}
