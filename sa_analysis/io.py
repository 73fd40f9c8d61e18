"""Atomic file writes: an artefact is either complete on disk or absent, never half written."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UserError


OUTPUT_ROOT = Path("sa-output")


def default_out_dir(out: str | Path | None, model: str) -> Path:
    """The output folder: `out` when given, else sa-output/<model name made path-safe>/."""
    if out is not None:
        return Path(out)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name or model)
    return OUTPUT_ROOT / safe


def ensure_writable_dir(path: str | Path) -> Path:
    """Check, before any long work starts, that `path` can hold the outputs: a writable folder, or one that can be
    made under a writable parent. Nothing is created here (the writers make the folder with their first file), so a
    command that fails leaves nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file, not a folder; choose a folder (new or existing) with --out.")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"The output folder {path} is not writable: {existing} is a file, not a folder; choose a folder with --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"The output folder {path} is not writable (no write permission in {existing}); choose another with --out.")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # the usual permissions (mkstemp leaves 0600)
        with tmp_path.open("rb") as written:
            os.fsync(written.fileno())  # durable before it replaces the old file
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON artefact; a missing or damaged file is a user error naming `what` it should have been."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"The {what} file {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"The {what} file {path} could not be read ({type(exc).__name__}); pass a file written by sa-analyze.") from None


def read_user_text(path: str | Path, what: str, hint: str) -> str:
    """The text of a user's input file; a missing or unreadable file is a user error (`hint`: what to pass instead)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"The {what} {path} does not exist; {hint}.")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"The {what} {path} could not be read ({exc.strerror}); check its permissions.") from None
    text = raw.decode("utf-8", errors="replace")
    if b"\x00" in raw[:65536] or text[:65536].count("\ufffd") > 0.05 * min(len(text), 65536):
        raise UserError(f"The {what} {path} is not text (it holds binary data); {hint}.")
    return text


def json_safe(value: Any) -> Any:
    """Plain JSON: dict keys as strings, inf/NaN as strings/None, tensors and numpy scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
