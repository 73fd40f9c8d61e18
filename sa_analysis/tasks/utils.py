"""Loader for the local lm-evaluation-harness tasks shipped with sa-analysis (read from this folder, offline)."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_docs(**_kwargs):
    """The questions of sa_tiny_mc as a datasets.DatasetDict with one `test` split."""
    import datasets

    rows = [json.loads(line) for line in (HERE / "sa_tiny_mc.jsonl").read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
