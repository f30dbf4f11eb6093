"""The ``megatron`` command line. Each sub-command lives in ``megatron/commands/<name>.py``."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rich.console import Console

from megatron.errors import MegatronError

COMMANDS = ("run", "plugins", "config", "data", "pretrain", "similarity", "benchmark", "report")

console = Console(stderr=True)


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
        console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: checkpoints written so far are kept; `--resume` continues.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
