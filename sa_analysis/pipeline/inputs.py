"""What every job takes: the model to load (`ModelSpec`), the text to measure on (`TextSpec`), how attention is
captured when a job measures a report (`CaptureSpec`), and how it shows progress (`Status`, `Bar`, `Say`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ContextManager

from .. import defaults
from ..data import token_batch
from ..loading import LoadedModel
from ..progress import Say  # noqa: F401 (the jobs' progress callback, re-exported to them)
from ..shared_model import load_with_plan

Status = Callable[[str], ContextManager]  # shows a message while a step runs (the CLI passes a spinner)
Bar = Callable[[int], ContextManager]  # bar(total) yields advance(i) (the CLI passes a rich progress bar)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how: the options every job shares."""

    model: str | None = defaults.MODEL  # None: the model a saved report names
    device: str | None = None
    dtype: str | None = None
    random_init: bool = False
    device_map: str | None = None

    def load(self, status: Status | None = None) -> LoadedModel:
        with status_of(status, f"loading {self.model}"):
            return load_with_plan(self.model, device=self.device, dtype=self.dtype, random_init=self.random_init,
                              device_map=self.device_map)


@dataclass(frozen=True)
class TextSpec:
    """Which text to measure on: a file (None: CPython's documentation topics), sequences and their length
    (`seq_len` None: the job's default, `defaults.SEQ_LEN`, or for an attention report `shapes.analysis_length`)."""

    text: str | Path | None = None
    n_seqs: int = defaults.N_SEQS
    seq_len: int | None = defaults.SEQ_LEN

    def batch(self, loaded: LoadedModel, split: str):
        """`n_seqs` sequences of `seq_len` tokens from the `split` ("calibration" or "heldout") part of the text."""
        return token_batch(loaded.tokenizer, text=self.text, split=split, n_seqs=self.n_seqs,
                           seq_len=self.seq_len or defaults.SEQ_LEN, max_positions=loaded.info.max_positions,
                           vocab_size=loaded.info.vocab_size)

    def damage_batch(self, loaded: LoadedModel):
        """The calibration tokens output damage is measured on: whole sequences of `seq_len`,
        `defaults.DAMAGE_TOKENS` in all and at least two (their spread gives the intervals)."""
        seq_len = self.seq_len or defaults.SEQ_LEN
        n_seqs = max(2, -(-defaults.DAMAGE_TOKENS // seq_len))
        return replace(self, n_seqs=n_seqs, seq_len=seq_len).batch(loaded, "calibration")


@dataclass(frozen=True)
class CaptureSpec:
    """How an attention report is measured: the first `exclude_first` key positions (attention sinks) left out,
    materialised maps or streaming (`path`), all query rows or a sample (`rows`), the figure formats."""

    exclude_first: int = 0
    path: str = "auto"
    rows: str | int = defaults.ROWS
    formats: tuple[str, ...] = ("png",)


def status_of(status: Status | None, message: str) -> ContextManager:
    return status(message) if status else nullcontext()
