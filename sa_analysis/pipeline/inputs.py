"""What every job takes: the model to load (`ModelSpec`), the text to measure on (`TextSpec`), and how it shows
progress (`Status`)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

from .. import defaults
from ..data import token_batch
from ..loading import LoadedModel
from ..shared_model import load_with_plan

Status = Callable[[str], ContextManager]  # shows a message while a step runs (the CLI passes a spinner)


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how: the options every job shares."""

    model: str = defaults.MODEL
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
    """Which text to measure on: a file (None: CPython's documentation topics), sequences and their length."""

    text: str | Path | None = None
    n_seqs: int = defaults.N_SEQS
    seq_len: int = defaults.SEQ_LEN

    def batch(self, loaded: LoadedModel, split: str):
        return token_batch(loaded.tokenizer, text=self.text, split=split, n_seqs=self.n_seqs, seq_len=self.seq_len,
                           max_positions=loaded.info.max_positions, vocab_size=loaded.info.vocab_size)


def status_of(status: Status | None, message: str) -> ContextManager:
    return status(message) if status else nullcontext()
