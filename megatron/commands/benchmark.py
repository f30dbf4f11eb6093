"""``megatron benchmark``: the learners-vs-baseline grid at equal compute, with resume, workers and shards."""
from __future__ import annotations

import argparse

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


def _n_source(x: str):
    return None if x.lower() == "all" else int(x)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark", help="run learners x seeds x N source tasks x shots K at equal compute; write results + report",
        description="Runs every cell of a grid (learners x seeds x number of source tasks x shots x learning rates x "
        "source selection) at the same compute budget, each in OUT/cells/<cell-id>/, then writes OUT/results.csv, "
        "OUT/results.json, OUT/report.md and OUT/plots/. Re-running the same command skips finished cells and "
        "resumes killed ones. Command-line lists override the grid file. See examples/benchmarks/README.md.")
    p.add_argument("-c", "--config", metavar="GRID.yaml", help="benchmark file: `base:` experiment config + `grid:`")
    p.add_argument("--learners", type=_csv(str), help="learner plugins, e.g. reptile,maml,finetune (finetune is "
                   "always added: the paired comparison needs it)")
    p.add_argument("--seeds", type=_csv(int), help="seeds, e.g. 0,1,2 (>= 2 for confidence intervals)")
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
                   help="override a key of the base experiment config, e.g. --set training.meta_epochs=3; repeatable")
    p.add_argument("--dry-run", action="store_true", help="list the cells and the budget, run nothing")
    p.add_argument("--no-resume", action="store_true", help="start every cell of this run over (deletes their earlier run.json and checkpoints)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="delete each cell's checkpoints once it is complete (saves tens of MB per cell)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml
    from rich.console import Console
    from rich.table import Table

    from megatron.benchmark.grid import expand_grid, load_benchmark_config, parse_shard, run_benchmark

    console = Console()
    base_overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.meta_epochs=2")
        key, value = item.split("=", 1)
        base_overrides[key.strip()] = yaml.safe_load(value)
    grid = {"learners": args.learners, "seeds": args.seeds, "n_sources": args.n_sources, "shots": args.shots,
            "lrs": args.lrs, "selection": args.selection, "detector": args.detector, "budget": args.budget}
    bcfg, base = load_benchmark_config(args.config, grid, base_overrides)
    shard = parse_shard(args.shard)
    if args.dry_run:
        plan = expand_grid(bcfg, base)
        table = Table(title=f"{len(plan.cells)} cells; budget: {plan.budget_note}")
        for col in ("#", "cell", "sources"):
            table.add_column(col)
        for c in plan.cells:
            if c.index % shard[1] == shard[0]:
                table.add_row(str(c.index), c.id, ", ".join(c.sources) if c.sources else f"closest {c.n_sources}")
        console.print(table)
        for note in plan.notes:
            console.print(f"note: {note}")
        return 0
    result = run_benchmark(bcfg, base, args.out, workers=args.workers, shard=shard, resume=not args.no_resume,
                           progress=not args.no_progress, prune_checkpoints=args.prune_checkpoints)
    console.print(f"cells: {len(result.ran)} run, {len(result.skipped)} already complete, {len(result.failed)} failed "
                  f"(of {len(result.plan.cells)} in the grid; shard {shard[0]}/{shard[1]})")
    for cid, err in result.failed.items():
        console.print(f"[red]failed[/] {cid}: {err}", highlight=False)
    console.print(f"results: {result.out_dir / 'results.csv'}, report: {result.out_dir / 'report.md'}")
    return 1 if result.failed else 0
