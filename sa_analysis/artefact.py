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
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping

from .errors import UserError
from .io import json_safe, read_json, write_json


class Record:
    """A record inside an artefact (a dataclass subclassing this): its fields as a dict, written as they are (a field
    holding records, alone or as the values of a dict, as their dicts), and back; a field an older file lacks reads
    as None. A field holding a record names its type in `RECORDS`, a dict of records in `RECORD_MAPS`."""

    RECORDS: ClassVar[dict[str, type]] = {}  # field -> the record type of its value
    RECORD_MAPS: ClassVar[dict[str, type]] = {}  # field -> the record type of each value of its dict

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(value) for name, value in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        values = {f.name: data.get(f.name) for f in fields(cls)}
        for name, kind in cls.RECORDS.items():
            values[name] = None if values[name] is None else kind.from_dict(values[name])
        for name, kind in cls.RECORD_MAPS.items():
            values[name] = None if values[name] is None else {k: kind.from_dict(v) for k, v in values[name].items()}
        return cls(**values)


def _plain(value: Any) -> Any:
    """A record as its dict, a dict of records as a dict of dicts; anything else as it is."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict) and any(isinstance(v, Record) for v in value.values()):
        return {k: _plain(v) for k, v in value.items()}
    return value


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
