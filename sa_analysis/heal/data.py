"""Heal training data: Alpaca rows (loss on the response only), JSONL text or plain text (loss on every token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import UserError
from ..data import ALPACA_PROMPT, DATA_HINT, alpaca_prompt, is_alpaca_row, is_heldout, json_rows  # noqa: F401 (re-exported)
from ..io import read_user_text


IGNORE_INDEX = -100


@dataclass
class HealData:
    """Training examples: token ids and labels (IGNORE_INDEX where no loss is taken), each at most seq_len long."""

    examples: list[tuple[torch.Tensor, torch.Tensor]]
    kind: str  # "alpaca" (loss on responses) or "text" (language-model loss)
    source: str
    pad_id: int
    n_rows: int = 0
    n_skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> dict[str, Any]:
        lengths = [len(ids) for ids, _ in self.examples]
        loss_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in self.examples)
        return {"source": self.source, "kind": self.kind, "n_rows": self.n_rows, "n_examples": len(self.examples),
                "skipped": dict(self.n_skipped), "n_tokens": sum(lengths), "n_loss_tokens": loss_tokens,
                "max_len": max(lengths) if lengths else 0}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One example as the Trainer's dataset row: {"input_ids", "labels"} (this object is the train dataset)."""
        ids, labels = self.examples[index]
        return {"input_ids": ids, "labels": labels}

    def collate(self, rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The Trainer's data collator: right-padded `input_ids`, `attention_mask`, `labels` [b, longest], padded with
        the data's pad id (its vocabulary's, which a tokenizer's pad token may not be for a folded test vocabulary),
        no loss and no attention on padding."""
        rows = [(row["input_ids"], row["labels"]) for row in rows]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)] = ids
            labels[r, :len(ids)] = lab
            mask[r, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def alpaca_example(tokenizer: Any, row: Mapping[str, Any], seq_len: int,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(ids, labels) for one Alpaca row: labels are IGNORE_INDEX on the prompt, the response + EOS is learned.

    The response is cut to fit `seq_len`; None when the prompt leaves no room for a response token.
    """
    prompt = tokenizer(alpaca_prompt(row))["input_ids"]
    response = tokenizer(str(row["output"]).strip(), add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        response = response + [eos]
    room = seq_len - len(prompt)
    if room < 1 or not response:
        return None
    response = response[:room]
    ids = torch.tensor(prompt + response, dtype=torch.long)
    if vocab_size is not None:
        ids = ids % vocab_size
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE_INDEX
    return ids, labels


def load_heal_data(source: str | Path | None, tokenizer: Any = None, *, seq_len: int = 256,
                   vocab_size: int | None = None, max_examples: int | None = None) -> HealData:
    """Training data from an Alpaca-style JSON/JSONL file (instruction, input, output: loss on the output only), or
    any text the analysis reads (`data.load_documents`: the default text, `python-source`, a plain-text file as one
    document, JSONL rows with a `text` field, a folder of text files; language-model loss on windows of `seq_len`
    tokens). Only the calibration part is used (the held-out part is where a heal is judged on its own kind of text,
    `data.token_batch` reads it): the calibration documents by the stable hash of their names, Alpaca's calibration
    rows by the same hash of the row's number. Without a tokenizer (random-init models) the default tokenizer's ids
    are folded into `vocab_size`. `max_examples` stops tokenizing once that many text windows are collected.
    """
    from ..data import default_tokenizer, load_documents, split_documents

    if tokenizer is None:
        tokenizer = default_tokenizer()
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None) or 0
    pad = int(pad) % vocab_size if vocab_size else int(pad)
    alpaca = _alpaca_rows(source)
    if alpaca is not None:
        path, numbered = alpaca
        kept = [row for number, row in numbered if not is_heldout(f"{path.name}#{number}")] or [r for _, r in numbered]
        return _alpaca_data(kept, tokenizer, seq_len, vocab_size, f"{path} (calibration part)", pad, len(numbered))
    docs, name = load_documents(source, option="--data")  # the same reading as --text
    calibration = split_documents(docs, "calibration") or docs
    return _text_data(calibration, tokenizer, seq_len, vocab_size, max_examples, f"{name} (calibration part)", pad, len(docs))


def _alpaca_rows(source: str | Path | None) -> tuple[Path, list[tuple[int, Any]]] | None:
    """(path, numbered rows) when the source is a JSON/JSONL file of Alpaca-style rows (an `instruction` or `output`
    field in some row); None for any other source, which `data.load_documents` reads as text."""
    if source is None or Path(str(source)).suffix.lower() not in (".json", ".jsonl"):
        return None
    path = Path(source).expanduser()
    raw = read_user_text(path, "data file", DATA_HINT)
    if not raw.strip():
        raise UserError(f"The data file {path} has no usable rows: it is empty.")
    numbered = json_rows(raw, path, "data file")
    if any(isinstance(r, dict) and ("instruction" in r or "output" in r) for _, r in numbered):
        return path, numbered
    if not any(isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip() for _, r in numbered):
        raise UserError(f"The data file {path} has no usable rows: {len(numbered)} rows, none with Alpaca fields "
                        f"(instruction, output) or a non-empty 'text' field.")
    return None


def _alpaca_data(rows: list[Any], tokenizer: Any, seq_len: int, vocab_size: int | None, source: str, pad: int,
                 n_rows: int) -> HealData:
    """Examples of the Alpaca rows kept for training (`n_rows`: the file's rows, the held-out ones included)."""
    examples, missing, too_long = [], 0, 0
    for row in rows:
        if not is_alpaca_row(row):
            missing += 1
            continue
        example = alpaca_example(tokenizer, row, seq_len, vocab_size)
        if example is None:
            too_long += 1
            continue
        examples.append(example)
    if not examples:
        raise UserError(f"The data file {source} has no usable rows: {len(rows)} rows, {missing} without an instruction "
                        f"and an output, {too_long} whose prompt fills --seq-len {seq_len}; fix the file or raise --seq-len.")
    return HealData(examples, "alpaca", source, pad, n_rows, {"no_instruction_or_output": missing, "prompt_too_long": too_long})


def _text_data(docs: list[tuple[str, str]], tokenizer: Any, seq_len: int, vocab_size: int | None,
               max_examples: int | None, source: str, pad: int, n_rows: int) -> HealData:
    """Windows of `seq_len` tokens over the documents joined as `data.token_batch` joins them (a shorter text gives
    one shorter window)."""
    from ..data import document_separator, join_documents

    ids = join_documents(tokenizer, docs, document_separator(tokenizer),
                         needed=None if max_examples is None else max_examples * seq_len)
    if len(ids) < 2:
        raise UserError(f"The data {source} has no usable rows: fewer than 2 tokens of text.")
    stream = torch.tensor(ids, dtype=torch.long)
    if vocab_size is not None:
        stream = stream % vocab_size
    n = len(ids) // seq_len
    windows = list(stream[: n * seq_len].view(n, seq_len)) if n else [stream]
    if max_examples is not None:
        windows = windows[:max_examples]
    return HealData([(w.clone(), w.clone()) for w in windows], "text", source, pad, n_rows)
