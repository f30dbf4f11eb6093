"""``megatron pretrain``: train the detector on the source tasks (merged label space) and write a checkpoint
that ``megatron run --checkpoint PATH`` starts from."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
import dataclasses
from pathlib import Path

from megatron.commands.common import COMBINE_HELP, add_config_arguments, config_from_args, config_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", conflict_handler="resolve",
        help="pre-train the detector on the source tasks and write a checkpoint for `megatron run --checkpoint`",
        description="Conventional pre-training (step 1 of the method): the detector is trained on every source "
        "task of the config (the target is never seen) with the tasks' classes merged into one label space "
        "('<task>/<category>'). The checkpoint is written atomically after every epoch. `megatron run "
        "--checkpoint PATH` loads it and re-initialises only the classifier for the target's classes. " + COMBINE_HELP,
    )
    add_config_arguments(p)
    # replaces the config's --out (output.dir): this command writes one checkpoint file
    p.add_argument("--out", dest="pretrain_out", metavar="PATH", required=True,
                   help="checkpoint file to write, e.g. checkpoints/yolox-pretrained.pt")
    config_option(p, "--epochs", key="training.pretrain_epochs", type=int,
                  help="passes over every source image (default: the config's, as stage 1 of `megatron run`)")
    config_option(p, "--lr", key="training.pretrain_lr", type=float,
                  help="peak learning rate, AdamW with one-cycle schedule (default: the config's)")
    config_option(p, "--batch-size", key="training.batch_size", type=int, help="images per batch")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick trials)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--logger", action="append", metavar="NAME",
                   help="switch on a logger plugin (e.g. tensorboard, csv) for the loss per step; it writes to "
                        "<checkpoint stem>-logs/ beside the checkpoint; repeatable")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from rich.table import Table

    from megatron import get_plugin_manager
    from megatron.runtime.console import output_console, print_full_width
    from megatron.training.pretrain import pretrain, stage1_settings

    from megatron.training.run_loggers import active_loggers, call_logger_hook, log_scalars, validate_loggers, with_cli_loggers

    cfg = with_cli_loggers(config_from_args(args), args.logger)
    pm = get_plugin_manager()  # a plugin that failed to load stops the command here (exit 2)
    validate_loggers(cfg, pm)
    out = Path(args.pretrain_out)
    # the settings of stage 1 of `megatron run` (with the default seeds, this command writes the checkpoint a run
    # would train; `run` seeds stage 1 with training.pretrain_seed, this command with --seed)
    settings = dataclasses.replace(stage1_settings(cfg), max_steps=args.max_steps)
    log_dir = out.with_name(f"{out.stem}-logs")
    with active_loggers(cfg, pm, log_dir) as loggers:
        if loggers:
            log_dir.mkdir(parents=True, exist_ok=True)
            call_logger_hook(pm, loggers, "megatron_run_start", config=cfg, run_dir=log_dir)
            call_logger_hook(pm, loggers, "megatron_stage_start", stage="pretrain",
                             info={"epochs": settings.epochs, "cache_key": None})
        result = pretrain(cfg, pm, out, settings, progress=not args.no_progress,
                          on_step=lambda step, loss: log_scalars(loggers, "pretrain", step, {"loss": loss}))
        if loggers:
            call_logger_hook(pm, loggers, "megatron_stage_end", stage="pretrain",
                             info={"checkpoint": str(result.path), "reused": False, "wall_s": round(result.seconds, 3)})
    console = output_console()
    table = Table(title=f"pretrained {cfg.detector.name} on {len(result.tasks)} source task(s)")
    table.add_column("epoch", justify="right")
    table.add_column("mean loss", justify="right")
    for i, loss in enumerate(result.losses, 1):
        table.add_row(str(i), f"{loss:.4f}")
    print_full_width(console, table)
    console.print(f"{len(result.categories)} classes ({', '.join(result.categories[:6])}"
                  f"{', ...' if len(result.categories) > 6 else ''}); {result.steps} steps in {result.seconds:.0f} s")
    console.print(f"checkpoint: [bold]{result.path}[/]  — start a run from it with "
                  f"`megatron run --detector {cfg.detector.name} --checkpoint {result.path}`")
    return 0
