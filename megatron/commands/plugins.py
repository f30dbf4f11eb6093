"""``megatron plugins``: every registered plugin with its kind, package, version and hooks."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
import json

from rich.markup import escape
from rich.table import Table

from megatron.runtime.console import output_console, print_full_width


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list every registered plugin (kind, name, package, version, hooks)",
                       description="List every plugin megatron found: built-ins and those installed through the "
                       "'megatron' entry-point group. Plugins that failed to load are listed with the reason.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager

    pm = get_plugin_manager(strict=False)  # list what failed to load instead of stopping
    rows = pm.plugins_table()
    failures = [dict(plugin=f.plugin, package=f.package, stage=f.stage, hook=f.hook, reason=f.reason, fix=f.fix)
                for f in pm.failures]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return 0
    table = Table(title="megatron plugins")
    for col in ("kind", "name", "plugin", "package", "version", "hooks"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["kind"], r["name"], r["plugin"], r["package"], r["version"], ", ".join(r["hooks"]))
    console = output_console()
    print_full_width(console, table)
    for f in pm.failures:
        console.print(f"[yellow]warning:[/] {escape(str(f))}\n  [dim]fix:[/] {escape(f.fix)}", highlight=False)
    if pm.failures:
        console.print(f"{len(pm.failures)} plugin(s) failed to load: every other command stops until they are fixed "
                      "or blocked.", highlight=False)
    return 0
