"""The one type of progress callback: a job hears one line of text per step done (a measurement, a budget, a heal
step), or a note before long work, and shows it how it likes (a spinner, plain lines, a log)."""

from __future__ import annotations

from typing import Callable

Say = Callable[[str], None]
