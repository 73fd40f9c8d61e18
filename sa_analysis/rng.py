"""Seeded work that leaves the caller's random state as it was (library code never re-seeds the global RNG for good).

Model initialisation (transformers, peft) and dropout draw from torch's global generators, which cannot be handed a
`torch.Generator`; `seeded(seed)` runs such work from a fixed seed inside `torch.random.fork_rng`, so that results
are reproducible and the user's own random streams continue undisturbed afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Within the block, torch's CPU and CUDA generators start from `seed`; on exit they are what they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
