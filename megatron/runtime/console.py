"""The console a command prints on. On a terminal rich keeps its own width and colours. On a file or a pipe (a
batch job's log, ``megatron run > log``, CI) rich would assume 80 columns, wrap every longer line and cut a
table's headers (``mAP50…``); there a text line is written whole (soft wrap: a path or a fix stays on one line
to copy) and a table takes the full width of its content (:func:`print_full_width`)."""
from __future__ import annotations

from typing import Any

from rich.console import Console


def output_console(stderr: bool = False, **kwargs: Any) -> Console:
    """A rich console on stdout (``stderr``: stderr) that never wraps a text line when it is not a terminal."""
    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal:
        console.soft_wrap = True
    return console


def print_full_width(console: Any, renderable: Any) -> None:
    """Print ``renderable`` (a table); on a file or pipe at the full width of its content, so no header is cut
    to 80 columns (a terminal keeps its own width)."""
    if console.is_terminal:
        console.print(renderable)
        return
    from rich.measure import Measurement  # rich's layout: imported with the table it measures (start-up time)

    natural = Measurement.get(console, console.options.update_width(100_000), renderable).maximum
    width = console.width
    console.width = max(width, natural)
    try:
        console.print(renderable)
    finally:
        console.width = width
