"""Downstream tasks through lm-evaluation-harness (`HFLM` wrapping the model object; local task files offline)."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..errors import UserError
from ..patch import share_attention

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"  # the shipped offline tasks (sa_tiny_mc)


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
        from ..data import default_tokenizer

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
