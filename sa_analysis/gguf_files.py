"""GGUF files offline: the packaged default model's file, its dequantised copy cached as safetensors (keyed by
content), and its tokenizer cached per transformers release."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

from .aliases import ModelAlias
from .compat import check_gguf_tokenizer


def cache_root() -> Path:
    """Where sa-analysis keeps dequantised copies of GGUF models (override with SA_ANALYSIS_CACHE)."""
    return Path(os.environ.get("SA_ANALYSIS_CACHE", Path.home() / ".cache" / "sa-analysis"))


def packaged_gguf_path(alias: ModelAlias) -> Path | None:
    """The GGUF file shipped inside a Python package (found without importing the package), or None."""
    if alias.packaged_gguf is None:
        return None
    package, filename = alias.packaged_gguf
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    return None


def gguf_cache(path: Path) -> Path:
    """The folder holding the dequantised weights of a GGUF file (one per file, whatever the transformers release)."""
    return cache_root() / f"gguf-{_file_key(path)}"


def gguf_tokenizer(path: Path):
    """The tokenizer of a GGUF file, cached per transformers release.

    A tokenizer saved by one transformers release can load differently in another (seen: 5.24's files read by 5.12
    as another tokenizer class), so each release converts the GGUF's vocabulary once and keeps its own copy; the
    weights beside it are plain safetensors, shared by every release.
    """
    return cached_gguf_tokenizer(path, gguf_cache(path))


PROBE_TEXT = "Shared attention: layer 12 reads the weights of layer 11.\n    def f(x):  # café, 2024 — done\n"
UNFAITHFUL = "NOT_CACHED"  # marks a release whose saved copy of this tokenizer reloads as another tokenizer


def cached_gguf_tokenizer(path: Path, cached: Path):
    """`gguf_tokenizer` for a GGUF file whose cache folder is `cached` (its key read once per load).

    The saved copy is kept only if it reloads to the same ids on `PROBE_TEXT` as the tokenizer converted from the
    GGUF: transformers 5.17 saves Gemma-3's GGUF vocabulary in a form that reloads as one token per character
    (held-out perplexity 2,857 instead of 19); such a release converts the GGUF at every load instead."""
    import transformers

    folder = cached / f"tokenizer-{transformers.__version__}"
    saved = (folder / "tokenizer_config.json").is_file()
    tokenizer = _from_pretrained(folder, local_files_only=True) if saved else _from_pretrained(path.parent, gguf_file=path.name)
    check_gguf_tokenizer(tokenizer)  # a release that converts this vocabulary wrongly is refused before anything is cached
    if not saved and not (folder / UNFAITHFUL).is_file():
        save_atomically(tokenizer, folder, marker="tokenizer_config.json")
        _keep_if_faithful(tokenizer, folder)
    return tokenizer


def _from_pretrained(*args, **kwargs):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(*args, **kwargs)


def _keep_if_faithful(tokenizer, folder: Path) -> None:
    """Drop the saved copy in `folder` (and mark the folder) unless it encodes `PROBE_TEXT` as `tokenizer` does."""
    marker = folder / "tokenizer_config.json"
    if not marker.is_file():
        return
    encode = lambda t: t(PROBE_TEXT, add_special_tokens=False)["input_ids"]  # noqa: E731
    try:
        same = encode(_from_pretrained(folder, local_files_only=True)) == encode(tokenizer)
    except (OSError, ValueError):
        same = False
    if not same:
        marker.unlink()
        (folder / UNFAITHFUL).write_text("this transformers release reloads its saved copy of the tokenizer as "
                                         "another tokenizer; the GGUF is converted at every load\n")


def save_atomically(obj, folder: Path, marker: str) -> None:
    """`obj.save_pretrained` into `folder` (which may hold other entries) through a temporary folder, moved in file by
    file with `marker` last, so a folder holding `marker` is complete. A failure to cache only costs time."""
    import shutil

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        obj.save_pretrained(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == marker):
            os.replace(item, folder / item.name)
    except (OSError, ValueError):
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_key(path: Path) -> str:
    """A key for a model file's content, not its place: its size and a hash of its first 4 MiB (a GGUF header holds
    the metadata and vocabulary). The same packaged file in another virtual environment finds the same cache."""
    with path.open("rb") as handle:
        head = handle.read(4 * 1024 * 1024)
    return hashlib.sha1(f"{path.stat().st_size}|".encode() + head).hexdigest()[:16]
