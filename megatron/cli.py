"""The ``megatron`` command line. Each sub-command lives in ``megatron/commands/<name>.py``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rich.markup import escape

from megatron.atomic_io import is_out_of_room, out_of_room_message
from megatron.errors import MegatronError
from megatron.runtime.console import output_console

#: exit status of a command stopped by a MegatronError (bad config, bad data, a run directory in use, ...);
#: argparse uses the same status for a bad command line. 130: interrupted (Ctrl-C).
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

COMMANDS = ("run", "plugins", "config", "data", "pretrain", "predict", "evaluate", "similarity", "benchmark",
            "report", "docs", "detectors")

console = output_console(stderr=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron",
        description="Few-shot meta-learning for object detection on medical images. "
        "Start with `megatron run --learner reptile --detector yolox` (built-in data, no other argument).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"megatron.commands.{name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MegatronError as exc:
        # the message is text, not markup: "[image id 3]" or "--set x=[...]" must print as written
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: checkpoints written so far are kept; `--resume` continues.")
        return EXIT_INTERRUPTED
    except (OSError, RuntimeError) as exc:
        if not is_out_of_room(exc):
            raise
        # a full disk outside megatron's own atomic writes (a drawing, a plot, a logger's file)
        where = getattr(exc, "filename", None)
        console.print(f"[bold red]error:[/] {escape(out_of_room_message(exc, where))}", highlight=False, markup=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
