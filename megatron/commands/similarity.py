"""``megatron similarity``: rank every source dataset by its distance to the target, per metric, with pictures."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from megatron.commands.common import add_config_arguments, config_from_args

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs") / "similarity"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similarity", conflict_handler="resolve",
        help="rank the source datasets by similarity to the target (tables, heatmaps, histograms, t-SNE)",
        description="Measure how close each source dataset is to the target under each similarity metric "
        "(built-in suite by default, the configured datasets otherwise). Prints one ranking table per metric "
        "and writes PNGs: averaged histograms, a distance heatmap per metric, a t-SNE of CNN embeddings. "
        "Metric options come from the config's `similarity.options.<metric>` (or --set).",
    )
    add_config_arguments(p)
    p.add_argument("--target", help="target task name (default: data.target)")
    p.add_argument("--metrics", help="comma-separated metric names (default: similarity.metrics)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    # replaces the config's --out (output.dir): this command writes pictures, not runs
    p.add_argument("--out", dest="similarity_out", metavar="DIR", default=str(DEFAULT_OUT),
                   help=f"folder for the PNGs and similarity.json (default: {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=_run)


def compute(cfg, pm, target_name: str, metric_names: list[str], progress=None) -> tuple[dict[str, Any], dict]:
    """Pairwise distances and the target's ranking per metric. Returns ``(result, metrics)``: the JSON-able
    result and the metric objects (their cached summaries feed the plots)."""
    from megatron.errors import ConfigError
    from megatron.experiment import load_tasks
    from megatron.training.runner import detector_feature_extractor, resolve_device
    from megatron.similarity import SimilarityContext, build_metric, pairwise_distances

    tasks = load_tasks(cfg, pm)
    by_name = {t.name: t for t in tasks}
    if target_name not in by_name:
        raise ConfigError(f"--target: no task named {target_name!r}; tasks loaded: {', '.join(by_name)}")
    source_names = [n for n in (cfg.data.sources or by_name) if n != target_name]
    unknown = [n for n in source_names if n not in by_name]
    if unknown:
        raise ConfigError(f"data.sources: unknown task(s) {', '.join(unknown)}; tasks loaded: {', '.join(by_name)}")
    if not source_names:
        raise ConfigError(f"there are no source tasks to compare with target {target_name!r}")
    ordered = [by_name[target_name], *(by_name[n] for n in source_names)]
    device = resolve_device(cfg.training.device)
    make, desc = detector_feature_extractor(cfg, pm, ordered[1:], device)
    ctx = SimilarityContext(seed=cfg.seed, device=device, input_size=cfg.data.input_size,
                            make_feature_extractor=make, feature_extractor_desc=desc)
    result: dict[str, Any] = {"target": target_name, "sources": source_names, "metrics": {}}
    metrics = {}
    for name in metric_names:
        metric = build_metric(pm, cfg, name, ctx)
        names, matrix, timings = pairwise_distances(metric, ordered, progress=progress)
        ranking = sorted(((names[j], float(matrix[0, j])) for j in range(1, len(names))), key=lambda r: (r[1], r[0]))
        result["metrics"][name] = {
            "unit": metric.unit, "note": metric.describe(),
            "ranking": [{"rank": i + 1, "name": n, "distance": d} for i, (n, d) in enumerate(ranking)],
            "pairwise": {"names": names, "distances": matrix.round(6).tolist()},
            "timings": {k: v for k, v in timings.items()},
        }
        metrics[name] = (metric, ordered)
    return result, metrics


def write_plots(result: dict[str, Any], metrics: dict, out: Path, seed: int) -> list[str]:
    from megatron.similarity import summarize_cached
    from megatron.similarity.plots import plot_heatmap, plot_histograms, plot_tsne

    written = []
    for name, entry in result["metrics"].items():
        pw = entry["pairwise"]
        written.append(plot_heatmap(pw["names"], np.asarray(pw["distances"]), name, entry["unit"],
                                    out / f"heatmap_{name}.png"))
        metric, tasks = metrics[name]
        summaries = {t.name: summarize_cached(metric, t)[0] for t in tasks}
        first = next(iter(summaries.values()))
        if hasattr(first, "hist") and hasattr(first, "centres"):
            written.append(plot_histograms({n: (s.centres, s.hist) for n, s in summaries.items()},
                                           out / f"histograms_{name}.png"))
        if hasattr(first, "features") and sum(len(s.features) for s in summaries.values()) >= 5:
            written.append(plot_tsne({n: s.features for n, s in summaries.items()}, out / f"tsne_{name}.png",
                                     seed=seed, note=entry["note"]))
    return [str(p) for p in written]


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from megatron import get_plugin_manager
    from megatron.checkpoint import atomic_write_json

    cfg = config_from_args(args)
    target = args.target or cfg.data.target
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else list(cfg.similarity.metrics)
    pm = get_plugin_manager()
    console = Console(stderr=args.json)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        job = bar.add_task("loading datasets", total=None)
        result, metrics = compute(cfg, pm, target, metric_names, progress=lambda text: bar.update(job, description=text))
        out = Path(args.similarity_out)
        if not args.no_plots:
            bar.update(job, description="writing plots")
            result["plots"] = write_plots(result, metrics, out, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "similarity.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, entry in result["metrics"].items():
        table = Table(title=f"{name}: sources ranked by distance to {target!r} (smaller = more similar)",
                      caption=entry["note"])
        table.add_column("rank", justify="right")
        table.add_column("source")
        table.add_column(f"distance ({entry['unit']})", justify="right")
        for row in entry["ranking"]:
            table.add_row(str(row["rank"]), row["name"], f"{row['distance']:.4g}")
        console.print(table)
        t = entry["timings"]
        console.print(f"  time: summarising (decoding, features) {t['summarize_s']:.2f}s, "
                      f"distances {t['distance_s']:.3f}s over {t['n_pairs']} pairs", highlight=False)
    console.print(f"wrote {out / 'similarity.json'}" + (f" and {len(result.get('plots', []))} PNGs" if not args.no_plots else ""),
                  highlight=False)
    return 0
