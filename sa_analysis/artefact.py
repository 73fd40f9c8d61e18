"""The base of every JSON artefact (SharePlan, ValidationReport, PlanSearch, HealReport; AttentionReport's header):
a format tag and version, an atomic save, a load that answers a wrong or damaged file in one sentence, JSON-safe
numbers (inf as "inf", NaN as null), and the provenance every artefact records.

A subclass names its `FORMAT`, what it is (`WHAT`), its usual file and the command that writes it (for the error
message), and, where its fields are not plain dataclass fields, `payload()` / `from_payload()`.
"""

from __future__ import annotations

import datetime as _dt
import platform
from importlib import metadata
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .errors import UserError
from .io import json_safe, read_json, write_json


class Record:
    """A record inside an artefact (a dataclass subclassing this): its fields as a dict, written as they are, and
    back; a field an older file lacks reads as None."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})


class JsonArtefact:
    FORMAT: ClassVar[str]
    VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str]  # "share plan": what the file should have been
    FILE: ClassVar[str]  # "plan.json"
    MADE_BY: ClassVar[str]  # "`sa-analyze recommend-spans`"

    def payload(self) -> dict[str, Any]:
        """The fields to save (default: the dataclass fields)."""
        return asdict(self)

    @classmethod
    def from_payload(cls, data: Mapping[str, Any], source: str):
        """An instance from saved fields (default: the dataclass constructor); may raise KeyError/TypeError/ValueError."""
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "version": self.VERSION, **json_safe(self.payload())}

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None):
        """Check the format tag and version, then rebuild; a wrong or damaged file is one UserError."""
        source = source or cls.WHAT
        if not isinstance(data, Mapping) or data.get("format") != cls.FORMAT:
            raise UserError(f"{source} is not an sa-analysis {cls.WHAT}; pass a {cls.FILE} written by {cls.MADE_BY}.")
        if int(data.get("version", 0) or 0) > cls.VERSION:
            raise UserError(f"{source} was written by a newer sa-analysis ({cls.WHAT} version {data.get('version')}); upgrade sa-analysis.")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            return cls.from_payload(fields, source)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source} is a damaged {cls.WHAT} ({type(exc).__name__}: {exc}); re-create it with {cls.MADE_BY}.") from None

    def save(self, path: str | Path) -> Path:
        """Write as indented JSON, atomically."""
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_json(path, cls.WHAT), source=str(path))


def provenance(device: Any = None) -> dict[str, str]:
    """What produced an artefact: package versions, Python, the device (and GPU name), and when."""
    import numpy
    import torch
    import transformers

    from .version import __version__

    made = {"sa_analysis": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "threads": str(torch.get_num_threads()),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    for package in ("accelerate", "peft"):
        try:
            made[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    if device is not None:
        made["device"] = str(device)
        if getattr(device, "type", None) == "cuda":
            made["gpu"] = torch.cuda.get_device_name(device)
    return made
