"""``megatron report``: rebuild results and report of one or more benchmark directories from their records."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse

from megatron.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="rebuild results.csv/json, report.md and plots from cell records (merges several dirs)",
        description="Reads DIR/cells/*/run.json (+ cell.json) of every DIR (benchmark outputs, shards, or run "
        "directories), counts identical cells once, and writes results.csv, results.json, report.md and plots/ "
        "into --out (default: the single DIR).")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="benchmark output directories")
    p.add_argument("--out", help="where to write (required with several DIRs)")
    p.add_argument("--model", choices=["selected", "final"], default="selected",
                   help="whose metrics: `selected` (default) = each cell's model chosen on the target's validation "
                        "split, measured on the held-out test split; `final` = the model after the last meta-epoch")
    p.add_argument("--equivalence-margin", type=float, metavar="POINTS",
                   help="the margin of the equivalence verdicts, in mAP points (default: the grid's "
                        "report.equivalence_margin, else 5)")
    p.add_argument("--epoch", type=int, help="the epoch of the fixed-epoch bar chart (default: the last all reached)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron.benchmark.report import build_report
    from megatron.runtime.console import output_console

    if len(args.dirs) > 1 and not args.out:
        raise ConfigError("megatron report: with several directories give --out (where the merged report goes)")
    out = args.out or args.dirs[0]
    res = build_report(args.dirs, out, epoch=args.epoch, model=args.model, margin=args.equivalence_margin)
    console = output_console()
    n_done = sum(r["status"] == "complete" for r in res.rows)
    console.print(f"{n_done} complete cell(s) of {len(res.rows)}; {len(res.plots)} plot(s)")
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    console.print(f"report: {res.out}/report.md")
    return 0
