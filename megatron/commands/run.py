"""``megatron run``: the experiment, end to end."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from megatron import hookimpl
from megatron.commands.common import add_config_arguments, config_from_args, config_option
from megatron.runtime.console import output_console, print_full_width
from megatron.training.progress import DEFAULT_LOG_EVERY, LOG_EVERY_S
from megatron.training.record import (CONFIG_FILE, CURVE_FILE, RECORD_FILE, SUMMARY_FILE, TABLE_METRICS,
                                     operating_point_lines)

DESCRIPTION = """\
The method's three stages: (1) pre-train the detector on the source tasks (stage 1; cached by content hash
and reused, skipped with --checkpoint FILE or --no-pretrain), (2) meta-train it on episodes of the source
tasks with the learner, (3) fine-tune a copy on the target's K-image pool after every meta-epoch and evaluate
it on the validation and held-out splits; and the `finetune` transfer-learning baseline from the same stage-1
checkpoint at the same compute. The adapted models are kept in RUN_DIR/models/ (`megatron predict`).

With no config it runs the built-in medsynth suite (6 source modalities, the EIT-like target, K = 20 shots) at
CPU size (YOLOX-tiny, 128 px): measured 8 min 41 s on an idle 2-core CPU with stage 1 cached, 14 min 37 s
with a cold cache (README, "what to expect"). A config file scales it up (examples/configs/gpu.yaml has the method's
full settings).

Meta-epochs, as the method counts them: one meta-epoch = M source epochs (training.source_epochs; an epoch
is enough outer steps for the meta-batches to see each source image about once, or
training.steps_per_epoch) + F fine-tuning epochs on the target pool (training.finetune_epochs), then an
evaluation on the validation and held-out splits. It is worth M + F baseline epochs: the method's M = 10,
F = 5 makes 20 meta-epochs about 300 baseline epochs. The CPU defaults are 4 meta-epochs of M = 1, F = 20
(84 baseline-equivalent epochs; F = 10 left the baseline unfinished: benchmarks/results/finetune_epochs/);
second-order MAML costs several times more per outer step than Reptile (use --budget to cap it).

Compute is counted in image passes (forward + backward). By default the learner runs its meta-epochs and
the baseline then trains until it has spent the same; --budget N instead trains every learner until N.

Several processes (GPUs, or CPU processes with --device cpu): --nproc N starts N processes on this machine with
torch's own launcher (torchrun), or launch it yourself, e.g. on several machines:
`torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m megatron run ...`
(examples/distributed/README.md). The tasks of every meta-batch are divided over the processes, so
training.meta_batch must be a multiple of their number; rank 0 writes the run directory.

Options and config: defaults < --config FILE < the command line. Each dedicated option is short for the
config key named in its help (--meta-epochs N is training.meta_epochs); giving it and --set for the same
key together is an error (exit 2), whatever their order. --set KEY=null sets a key to null (e.g.
--set training.grad_clip=null turns clipping off, --set data.eval_images=null evaluates on every target image except the max(K, 40) reserved for the K-shot
pools, at least 5).

One run per folder: a run locks its run directory while it runs; a second run into it stops at once
(exit 2) naming the process that holds it. A run writes only into folders that are megatron's (marked
`.megatron-run` when a run claims them): an existing non-empty folder without the marker is refused (exit 2,
listing what it holds) unless --force. A run that fails records `status: failed` and the error in
run.json; rerunning a folder whose run failed before its first checkpoint starts it afresh, one with
checkpoints needs --resume.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the experiment: meta-learner vs transfer-learning baseline at equal compute",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    config_option(p, "--meta-epochs", key="training.meta_epochs", type=int, metavar="N", help="meta-epochs")
    config_option(p, "--budget", key="training.compute_budget", type=int, metavar="N",
                  help="train every learner until it has spent N image passes")
    config_option(p, "--select-sources", key="similarity.select_sources", type=int, metavar="K",
                  help="meta-train on the K source tasks closest to the target")
    config_option(p, "--similarity", key="similarity.metric", metavar="NAME", help="the metric --select-sources ranks by")
    config_option(p, "--no-baseline", key="output.compare_baseline", value=False, action="store_true",
                  help="do not run the finetune baseline")
    config_option(p, "--name", key="output.name", help="run directory name under --out")
    config_option(p, "--no-pretrain", key="training.pretrain_epochs", value=0, action="store_true",
                  help="skip stage 1 (pre-training on the sources): every learner starts from random weights")
    config_option(p, "--split-from", key="data.split_from", metavar="RUN_JSON",
                  help="reuse the exact target split (pool / validation / held-out image ids) of another run")
    p.add_argument("--run-dir", metavar="DIR", help="the run directory (default: <out>/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run directory from its last checkpoints (same config)")
    p.add_argument("--force", action="store_true",
                   help="use --run-dir even if it holds files that are not a megatron run's (files of the names a run "
                        "writes are replaced; nothing else is touched)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (nor plain progress lines)")
    p.add_argument("--log-every", type=_positive_int, default=DEFAULT_LOG_EVERY, metavar="N",
                   help="when stdout is not a terminal (a log file, SLURM, CI): a progress line every N outer steps "
                        f"or {LOG_EVERY_S:g} s, whichever comes first (default {DEFAULT_LOG_EVERY}); stage and "
                        "evaluation lines always")
    p.add_argument("--logger", action="append", metavar="NAME",
                   help="switch on a logger plugin for this run, e.g. tensorboard, csv or mlflow (default options; options "
                        "go in the config's `loggers:` list); repeatable")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train across N processes on this machine (torchrun underneath; backend nccl on CUDA, gloo "
                        "on CPU); training.meta_batch must be a multiple of N")
    p.set_defaults(func=run_command, run_parser=p)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of steps, e.g. 10") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1 step")
    return value


def relaunch_argv(args: argparse.Namespace) -> list[str]:
    """The command line of ``args`` again (every option that differs from its default), without ``--nproc``:
    what each process started by ``--nproc`` runs."""
    argv = ["run"]
    for action in args.run_parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value = getattr(args, action.dest, None)
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def launch_processes(args: argparse.Namespace) -> int:
    """``--nproc N``: ``python -m megatron run ...`` in N processes through torch.distributed.run."""
    from megatron.runtime import distributed as mdist
    from megatron.errors import ConfigError

    cfg = config_from_args(args)  # a bad config fails here, once, not in N processes
    if cfg.training.meta_batch % args.nproc:
        raise ConfigError(f"--nproc {args.nproc}: training.meta_batch = {cfg.training.meta_batch} must be a multiple "
                          f"of the number of processes (e.g. --set training.meta_batch={args.nproc * max(1, cfg.training.meta_batch // args.nproc)})")
    device = cfg.training.device
    if device.startswith("cuda") or device == "auto":
        import torch

        gpus = torch.cuda.device_count()
        if device.startswith("cuda") and args.nproc > gpus:
            raise ConfigError(f"--nproc {args.nproc} with training.device={device}: this machine has {gpus} GPU(s); "
                              "start at most one process per GPU (or --device cpu)")
        if device == "auto" and 0 < gpus < args.nproc:
            raise ConfigError(f"--nproc {args.nproc}: this machine has {gpus} GPU(s); start at most one process per GPU, "
                              "or pass --device cpu for CPU processes")
    output_console(stderr=True).print(f"[dim]starting {args.nproc} processes (torch.distributed.run)...[/]")
    mdist.launch_local(args.nproc, relaunch_argv(args))
    return 0


def run_command(args: argparse.Namespace, pm=None) -> int:
    from megatron.runtime import distributed as mdist
    from megatron.training.runner import run_experiment

    if getattr(args, "nproc", None) is not None and args.nproc < 1:
        from megatron.errors import ConfigError

        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if (getattr(args, "nproc", None) or 1) > 1 and not mdist.launched_by_torchrun():
        from megatron import get_plugin_manager

        get_plugin_manager()  # a broken plugin stops here, reported once, not once per process
        return launch_processes(args)

    from megatron.training.run_loggers import with_cli_loggers

    cfg = with_cli_loggers(config_from_args(args), getattr(args, "logger", None))
    if args.similarity and not cfg.similarity.select_sources:
        from megatron.errors import ConfigError

        raise ConfigError("--similarity names the metric for --select-sources K; give --select-sources too "
                          "(or similarity.select_sources)")
    console = output_console()
    reporter = StageReporter(output_console(stderr=True))
    if pm is None:
        from megatron import get_plugin_manager

        pm = get_plugin_manager()
    pm.register(reporter, name="megatron.cli-stages")
    try:
        record = run_experiment(cfg, run_dir=Path(args.run_dir) if args.run_dir else None, pm=pm,
                                resume=args.resume, progress=not args.no_progress, log_every=args.log_every,
                                force=args.force)
    finally:
        pm.unregister(name="megatron.cli-stages")
        mdist.shutdown()
    if not mdist.is_main_process():
        return 0  # rank 0 prints the results
    print_full_width(console, results_table(record))
    for line in operating_point_lines(record):
        console.print(line, highlight=False)
    if record.get("comparison"):
        console.print(f"[dim]Equal compute: {record['comparison']['how']}.[/]")
    if record.get("selection"):
        console.print(f"[dim]Sources: {record['selection']['reason']}[/]")
    run_dir = Path(record["run_dir"])
    console.print(f"Run directory: [bold]{run_dir}[/] ({RECORD_FILE}, {CONFIG_FILE}, {SUMMARY_FILE}"
                  f"{', ' + CURVE_FILE if cfg.output.plots else ''}, checkpoints/"
                  f"{', models/' if cfg.output.save_models else ''})")
    models = [m for lrec in record.get("learners", {}).values() for k, m in (lrec.get("models") or {}).items()
              if k in ("final", "best")]
    if models:
        console.print(f"[dim]Adapted models (use with `megatron predict --checkpoint FILE IMAGES` or `megatron "
                      f"evaluate --checkpoint FILE DATASET`): {', '.join(models)}[/]")
    return 0


def results_table(record: dict) -> Table:
    """Learner vs baseline: the final held-out metrics (in %), compute and epochs; fits 80 columns."""
    short = {"precision": "P", "recall": "R", "FROC": "FROC"}
    ev = (record.get("config") or {}).get("evaluation", {})
    table = Table(title=f"{record.get('target')} held-out split ({record.get('eval_images')} images), "
                        f"K = {record.get('shots')} shots, seed {record.get('seed')}",
                  caption=f"metrics in %; P/R/F1 at score >= {ev.get('score_threshold', '?')}, IoU >= "
                          f"{ev.get('iou_threshold', '?')}; compute in image passes (forward + backward); "
                          "epochs: meta-epochs (baseline-equivalent epochs)")
    table.add_column("learner", no_wrap=True)
    for key, title in TABLE_METRICS:
        table.add_column(short.get(key, title), justify="right")
    table.add_column("compute", justify="right")
    table.add_column("epochs", justify="right")
    learners = record.get("learners", {})
    for name, lrec in learners.items():
        final = lrec.get("final") or {}
        cells = [f"{100 * final[k]:.1f}" if final.get(k) is not None else "–" for k, _ in TABLE_METRICS]
        table.add_row(name, *cells, f"{(lrec.get('compute') or {}).get('spent', 0):,}",
                      f"{len(lrec.get('epochs', []))} ({lrec.get('baseline_equivalent_epochs', 0):g})")
    names = list(learners)
    if len(names) == 2 and all(learners[n].get("final") for n in names):
        a, b = (learners[n]["final"] for n in names)
        table.add_row("difference", *(f"{100 * (a[k] - b[k]):+.1f}" for k, _ in TABLE_METRICS), "", "",
                      style="bold")
        table.caption += f"; difference: {names[0]} − {names[1]}, in points"
    best = {n: learners[n].get("best") for n in names if learners[n].get("best")}
    for name, b in best.items():
        table.add_row(f"{name} best", *(f"{100 * b[k]:.1f}" if b.get(k) is not None else "–"
                                                        for k, _ in TABLE_METRICS), "", f"{b['meta_epoch']}",
                      style="dim")
    if len(best) == 2:
        a, b = best.values()
        table.add_row("diff. best", *(f"{100 * (a[k] - b[k]):+.1f}" for k, _ in TABLE_METRICS), "", "",
                      style="dim bold")
    if best:
        table.caption += ("; '<learner> best': the held-out metrics of the meta-epoch (epochs column) whose adapted "
                          "model scored highest on the validation split (models/<learner>-best.pth)")
    return table


class StageReporter:
    """Prints one line when a stage of the run ends (what the split holds, which stage-1 checkpoint is used)."""

    def __init__(self, console: Console):
        self.console = console

    @hookimpl
    def megatron_stage_end(self, stage: str, info: dict) -> None:
        if stage == "prepare":
            self.console.print(f"[dim]target {info['target']}: pool {info['pool']}, validation {info['validation']}, "
                               f"held-out {info['heldout']} images; sources: {', '.join(info['sources'])}[/]")
        elif stage == "select":
            self.console.print(f"[dim]sources: {info['reason']}[/]")
        elif stage == "pretrain":
            how = "reusing the cached" if info["reused"] else f"trained ({info['wall_s']:.0f} s) and cached the"
            self.console.print(f"[dim]stage 1: {how} pre-trained checkpoint {info['checkpoint']}[/]")
