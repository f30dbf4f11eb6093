"""``megatron config show|validate``."""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.syntax import Syntax

from megatron.commands.common import add_config_arguments, config_from_args
from megatron.config import dump_config, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective config or validate a config file",
                       description="Show the effective experiment config (defaults < YAML < CLI) or validate a YAML file.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the effective config as YAML",
                           description="Print the effective config: defaults, overridden by --config FILE, overridden by CLI options.")
    add_config_arguments(show)
    show.set_defaults(func=_show)
    val = csub.add_parser("validate", help="check a config file and report every error with its key path",
                          description="Validate FILE, including each plugin's own options; prints every error with its key path.")
    val.add_argument("file")
    val.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    Console().print(Syntax(dump_config(cfg), "yaml", background_color="default"))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager
    from megatron.experiment import validate_experiment_plugins

    cfg = load_config(args.file)
    validate_experiment_plugins(cfg, get_plugin_manager())
    Console().print(f"[green]{args.file}: valid[/]")
    return 0
