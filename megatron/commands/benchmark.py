"""``megatron benchmark``: the learners-vs-baseline grid at equal compute, with resume, workers and shards."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse

from megatron.commands.common import parse_set_options
from megatron.errors import ConfigError


def _csv(kind):
    def parse(text: str):
        items = [x.strip() for x in text.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {kind.__name__}") from None
    return parse


def _last_set(items: list[str], key: str) -> str:
    return next((i.partition("=")[2] for i in reversed(items) if i.partition("=")[0].strip() == key), "")


def _n_source(x: str):
    return None if x.lower() == "all" else int(x)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run learners x seeds x N source tasks x shots K at equal compute; write results + report",
        description="Runs every cell of a grid (learners x seeds x number of source tasks x shots x learning rates x "
        "source selection) at the same compute budget, each in OUT/cells/<cell-id>/, plus the power check's two controls "
        "(finetune from random weights must lose; an A/A replicate of finetune must not differ; --no-controls skips "
        "them), then writes OUT/results.csv, "
        "OUT/results.json, OUT/report.md and OUT/plots/. Re-running the same command skips finished cells and "
        "resumes killed ones. Command-line lists override the grid file. See examples/benchmarks/README.md.")
    p.add_argument("-c", "--config", metavar="GRID.yaml", help="benchmark file: `base:` experiment config + `grid:`")
    p.add_argument("--learners", type=_csv(str), help="learner plugins, e.g. reptile,maml,finetune (finetune is "
                   "always added: the paired comparison needs it)")
    p.add_argument("--seeds", type=_csv(int), help="seeds, e.g. 0,1,2,3,4 (default: the grid's, else 0..4; >= 2 for "
                   "confidence intervals, >= 5 recommended)")
    p.add_argument("--n-sources", type=_csv(_n_source), help="numbers of source tasks N, e.g. 2,3,4,5,6 or all")
    p.add_argument("--shots", type=_csv(int), help="target shots K, e.g. 20,40")
    p.add_argument("--lrs", type=_csv(float), help="learning rates to sweep (set grid.lr_keys; default outer+finetune)")
    p.add_argument("--selection", type=_csv(str), help="source choice for N < all: random,closest,all")
    p.add_argument("--detector", help="detector plugin (default: the base config's)")
    p.add_argument("--budget", type=int, help="compute budget per cell in image passes (forward + backward)")
    p.add_argument("--workers", type=int, default=1, help="cells run in parallel processes (default 1)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run only cells whose grid index mod N == I "
                   "(job arrays / several machines); merge with `megatron report DIR1 DIR2 ...`")
    p.add_argument("--out", default="runs/benchmark", help="output directory (default runs/benchmark)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the base experiment config, e.g. --set training.meta_epochs=3 (value "
                   "parsed as YAML; null sets the key to null); repeatable. --detector and --budget are short for "
                   "detector.name and training.compute_budget: giving one together with --set for that key is an "
                   "error (exit 2), whatever the order")
    p.add_argument("--logger", action="append", metavar="NAME",
                   help="switch on a logger plugin (e.g. tensorboard, csv, mlflow) in every cell; it writes under each "
                        "cell's run directory (mlflow: one parent run per grid, a nested run per cell); repeatable (options: the base config's `loggers:` list)")
    p.add_argument("--no-controls", action="store_true",
                   help="skip the power check's controls (finetune from random weights; an A/A replicate of finetune), "
                   "which otherwise run in the grid's first setting; the report then cannot vouch for its verdicts")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="a benchmark folder (or committed result folder) whose complete cells stand in for this grid's "
                   "identical ones: same resolved config but for output/cache paths, same versions; repeatable")
    _executor_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="list the cells and the budget, run nothing")
    p.add_argument("--no-resume", action="store_true", help="start every cell of this run over (deletes their earlier run.json and checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="delete each cell's checkpoints once it is complete (saves tens of MB per cell)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megatron.benchmark.grid import expand_grid, load_benchmark_config, parse_shard, run_benchmark
    from megatron.runtime.console import output_console, print_full_width

    console = output_console()
    base_overrides = parse_set_options(args.set)
    for flag, value, key in (("--detector", args.detector, "detector.name"),
                             ("--budget", args.budget, "training.compute_budget")):
        if value is not None and key in base_overrides:
            raise ConfigError(f"{flag} and --set {key}={_last_set(args.set, key)} both set {key}; "
                              "give only one of them")
    grid = {"learners": args.learners, "seeds": args.seeds, "n_sources": args.n_sources, "shots": args.shots,
            "lrs": args.lrs, "selection": args.selection, "detector": args.detector, "budget": args.budget,
            "controls": False if args.no_controls else None}
    bcfg, base = load_benchmark_config(args.config, grid, base_overrides)
    base = _with_loggers(base, args.logger)
    shard = parse_shard(args.shard)
    if args.dry_run:
        _print_dry_run(console, expand_grid(bcfg, base), shard)
        return 0
    executor, slurm = _executor_from_args(args, bcfg)
    result = run_benchmark(bcfg, base, args.out, workers=args.workers, shard=shard, resume=not args.no_resume,
                           progress=not args.no_progress, prune_checkpoints=args.prune_checkpoints,
                           reuse=args.reuse, executor=executor, slurm=slurm, wait=not args.no_wait)
    return _print_result(console, result, shard)


def _print_dry_run(console, plan, shard: tuple[int, int]) -> None:
    from rich.table import Table  # with the console: CLI start-up time

    from megatron.runtime.console import print_full_width


    table = Table(title=f"{len(plan.cells)} cells; budget: {plan.budget_note}")
    for col in ("#", "cell", "sources"):
        table.add_column(col)
    for c in plan.cells:
        if c.index % shard[1] == shard[0]:
            table.add_row(str(c.index), c.id, ", ".join(c.sources) if c.sources else f"closest {c.n_sources}")
    print_full_width(console, table)
    for kind in ("positive", "negative"):
        cs = [c for c in plan.cells if c.control == kind]
        if cs:
            console.print(f"{kind} control: {cs[0].learner} ({len(cs)} cells)", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}")


def _print_result(console, result, shard: tuple[int, int]) -> int:
    """What ran, what failed, the power check and where the report is; the exit status (1: a cell failed)."""
    if result.submitted:
        console.print(f"submitted {len(result.submitted)} cell(s) ({result.executor}; jobs, logs and pickles in "
                      f"{result.out_dir / 'submitit'}); {len(result.skipped)} already complete, "
                      f"{len(result.reused)} reused. When the jobs are done: megatron report {result.out_dir} "
                      "(or run this command again: it skips finished cells, resumes killed ones and waits)",
                      highlight=False)
        return 0
    console.print(f"cells: {len(result.ran)} run, {len(result.skipped)} already complete, {len(result.reused)} reused, "
                  f"{len(result.failed)} failed "
                  f"(of {len(result.plan.cells)} in the grid; shard {shard[0]}/{shard[1]})")
    for cid, err in result.failed.items():
        console.print(f"[red]failed[/] {cid}: {err}", highlight=False)
    power = result.report.power if result.report is not None else None
    if power is not None:
        words = {"passed": "passed", "under-powered": "[red]failed: the grid is under-powered, verdicts withheld[/]",
                 "incomplete": "[yellow]positive control not complete, verdicts withheld[/]",
                 "no positive control": "no positive control"}[power.status]
        console.print(f"power check: {words}", highlight=False)
    console.print(f"results: {result.out_dir / 'results.csv'}, report: {result.out_dir / 'report.md'}")
    return 1 if result.failed else 0


def _executor_arguments(p: argparse.ArgumentParser) -> None:
    from megatron.benchmark.executors import EXECUTOR_NAMES

    g = p.add_argument_group("where the cells run (also the benchmark file's `executor:` section)")
    g.add_argument("--executor", choices=EXECUTOR_NAMES, help="local: this machine, --workers processes (default); "
                   "slurm: one SLURM job array through submitit (on a login node); submitit-local: the same "
                   "submitit jobs as processes on this machine")
    g.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition (executor.slurm.partition)")
    g.add_argument("--slurm-gpus-per-cell", type=int, metavar="N", help="GPUs per cell's job (default 1)")
    g.add_argument("--slurm-cpus-per-cell", type=int, metavar="N", help="CPU cores per cell's job (default 8)")
    g.add_argument("--slurm-time", metavar="MIN|H:MM:SS", help="time limit per cell's job (default 240 minutes); a "
                   "cell that runs out is resubmitted and resumes from its checkpoint")
    g.add_argument("--slurm-array-parallelism", type=int, metavar="N", help="cells of the array running at once "
                   "(default 32)")
    g.add_argument("--slurm-max-resubmits", type=int, metavar="N", help="resubmissions of a cell whose job was "
                   "pre-empted, hit a node fault or was killed (default 2)")
    g.add_argument("--no-wait", action="store_true", help="submit the cells and return (slurm, submitit-local); "
                   "`megatron report OUT` once they are done")


_SLURM_FLAGS = {"partition": "--slurm-partition", "gpus_per_cell": "--slurm-gpus-per-cell",
                "cpus_per_cell": "--slurm-cpus-per-cell", "time": "--slurm-time",
                "array_parallelism": "--slurm-array-parallelism", "max_resubmits": "--slurm-max-resubmits"}


def _executor_from_args(args: argparse.Namespace, bcfg):
    """The executor name and SLURM options: the benchmark file's `executor:` section, then the command line."""
    from pydantic import ValidationError

    from megatron.benchmark.executors import SlurmOptions
    from megatron.config import format_validation_error

    given = {key: getattr(args, f"slurm_{key}") for key in _SLURM_FLAGS if getattr(args, f"slurm_{key}") is not None}
    # a --slurm-* option alone means SLURM (the benchmark file's executor, if it names one, otherwise)
    executor = args.executor or (bcfg.executor.name if "executor" in bcfg.model_fields_set or not given else "slurm")
    if given and executor == "local":
        raise ConfigError(f"{', '.join(_SLURM_FLAGS[k] for k in given)} given, but the cells run with --executor local; "
                          "add --executor slurm (or submitit-local to try the same jobs on this machine)")
    try:
        slurm = SlurmOptions.model_validate({**bcfg.executor.slurm.model_dump(), **given})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "--slurm-* options")) from None
    return executor, slurm


def _with_loggers(base: dict, names: list[str] | None) -> dict:
    """The base experiment dict with ``--logger`` names switched on, checked against the installed plugins (a
    plugin that failed to load, an unknown logger or a bad logger option stops here, before any cell runs)."""
    from megatron import get_plugin_manager
    from megatron.config import ExperimentConfig
    from megatron.training.run_loggers import validate_loggers

    pm = get_plugin_manager()
    if names:
        present = {(e if isinstance(e, str) else e.get("name")) for e in base.get("loggers") or []}
        base = {**base, "loggers": [*(base.get("loggers") or []),
                                    *({"name": n} for n in dict.fromkeys(names) if n not in present)]}
    if base.get("loggers"):
        validate_loggers(ExperimentConfig.model_validate(base), pm)
    return base
