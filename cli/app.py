"""The typer app, the options every command shares, and the one place user errors become exit code 1.

Commands live in their own modules (`cli/heatmap.py`, `cli/recommend.py`, ...) and register on `app`; the
options below are declared once so that `--model`, `--text`, `--out`... mean the same in every command.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sa_analysis import defaults
from sa_analysis.errors import UserError

app = typer.Typer(
    name="sa-analyze",
    help="Find where a trained LLM's layers attend alike, plan Shared Attention spans, and prove them.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# On a terminal rich draws bars and spinners; piped or redirected, the same progress comes as plain lines with the
# elapsed time, and tables are laid out 200 columns wide instead of being cut at 80.
PIPED_WIDTH = 200
console = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)
err_console = Console(stderr=True)

# ----- options shared by every command ---------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Alias (llama2-7b, smollm2-135m, ...), hub id in the local HF cache, local folder, or .gguf file.")]
# --model without a default, where a command must tell "given" from "defaulted" (to check it against --report)
OptionalModelOpt = Annotated[Optional[str], ModelOpt.__metadata__[0]]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, cpu... Default: cuda when there is one, else cpu.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16, float32 or float64. Default: bfloat16 on GPU, float32 on CPU.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build an alias's architecture with random weights (timing work, no download).")]
DeviceMapOpt = Annotated[Optional[str], typer.Option("--device-map", help="'auto' spreads a large model over the GPUs of this host (accelerate).")]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="Plain-text or JSONL file (field 'text'). Default: CPython's documentation topics.")]
NSeqsOpt = Annotated[int, typer.Option("--n-seqs", min=1, help="Number of sequences to analyse.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per sequence.")]
AnalysisSeqLenOpt = Annotated[Optional[int], typer.Option("--seq-len", min=2, show_default=False, help=(
    f"Tokens per sequence. Default: {defaults.SEQ_LEN}, or twice the sliding window for a model that mixes windowed and "
    "global layers (so the analysis tells them apart)."))]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder. Default: sa-output/<model>/.")]
RowsOpt = Annotated[str, typer.Option("--rows", help=(
    "Query rows the streaming statistics use: all, a number to sample per sequence (estimates with a standard error "
    f"per entry), or auto: all unless that is predicted to take over {defaults.SAMPLE_ABOVE_SECONDS:.0f} s per "
    "sequence on this device."))]

# ----- which layers a plan may share (recommend-spans, frontier) ------------------------------------------------
FirstShareableOpt = Annotated[int, typer.Option("--first-shareable", help="No layer below this one is shared (shallow layers are fragile).")]
KeepOpt = Annotated[Optional[str], typer.Option("--keep", help="Layers never shared, e.g. 0,1,31 or 28-31.")]
MaxSpanOpt = Annotated[Optional[int], typer.Option("--max-span", help="At most this many consecutive followers per anchor.")]
AlignHeadsOpt = Annotated[str, typer.Option("--align-heads", help="auto: a follower reuses its anchor's heads through the best head map where that predicts (and, with --validate, measures) less than sharing by index; on: wherever it predicts less; off: by index.")]
AllowMaskChangeOpt = Annotated[bool, typer.Option("--allow-mask-change", help="Let a follower take an anchor whose attention mask differs (sliding window vs global); forbidden by default.")]

DEFAULT_MODEL = defaults.MODEL  # every default the CLI shows comes from the library (sa_analysis/defaults.py)
DEFAULT_N_SEQS = defaults.N_SEQS
DEFAULT_SEQ_LEN = defaults.SEQ_LEN


def default_out(out: Optional[Path], model: str) -> Path:
    """The output folder: `--out` when given, else sa-output/<model name made path-safe>/ (the library's default)."""
    from sa_analysis.prechecks import output_folder

    return output_folder(out, model)


def user_errors(command: Callable) -> Callable:
    """Turn a UserError into one red sentence on stderr and exit code 1 (no traceback for user mistakes)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]Interrupted.[/]")
            raise typer.Exit(code=130) from None

    return wrapper


@contextmanager
def sequence_progress(total: int):
    """A progress bar over sequences (plain lines when piped); yields the callback the pipeline calls after each."""
    if not console.is_terminal:
        started = time.perf_counter()
        yield lambda i: console.print(f"capturing attention: {i + 1}/{total} sequences "
                                      f"({time.perf_counter() - started:.0f} s)", highlight=False)
        return
    columns = (TextColumn("[bold]capturing attention"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("capture", total=total)
        yield lambda _i: progress.advance(task)


def loading_status(message: str):
    """A spinner while the model loads (the first use of a GGUF dequantises it, which takes a while)."""
    return spinner(f"{message} (the first use of a GGUF file dequantises and caches it)")


def spinner(message: str):
    """A spinner with `message` while a step runs (the library's `status` callback); piped, plain timed lines."""
    return console.status(f"[bold]{message}[/]") if console.is_terminal else PlainStatus(message)


class PlainStatus:
    """A spinner's stand-in for output that is not a terminal: a line at each update of a long step (a plan search,
    a heal), with the seconds since it started, and one when such a step ends well. Steps without updates (loading)
    print nothing, so that a mistake found after them is still answered by its one sentence alone."""

    def __init__(self, message: str):
        self.message, self.started, self.updated = message, time.perf_counter(), False

    def __enter__(self) -> "PlainStatus":
        return self

    def update(self, message: str) -> None:
        self.updated = True
        console.print(f"{_plain(self.message)}: {_plain(message)} ({time.perf_counter() - self.started:.0f} s)",
                      highlight=False)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self.updated:
            console.print(f"{_plain(self.message)}: done in {time.perf_counter() - self.started:.0f} s", highlight=False)


def _plain(message: str) -> str:
    """`message` without rich markup tags ([bold]...[/])."""
    from rich.text import Text

    return Text.from_markup(message).plain


def print_note(message: str) -> None:
    """A choice or caveat the user should know of, on its own line."""
    console.print(f"note: {message}", highlight=False)


def wrote(paths) -> None:
    """Print the files a command wrote, one per line."""
    for path in paths:
        console.print(f"  wrote [cyan]{path}[/]", highlight=False)


def format_bytes(value: float | None, missing: str = "-") -> str:
    """1536 -> '1.50 KiB'; `missing` when the value is unknown."""
    if value is None:
        return missing
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return str(value)
