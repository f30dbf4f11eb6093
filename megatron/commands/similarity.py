"""``megatron similarity``: rank every source dataset by its distance to the target, per metric, with pictures.

Datasets come from the config (``data.datasets``; an unannotated ``folder``/``dicom`` entry is fine) or,
with ``--folders DIR ... --target DIR``, straight from folders of images or DICOM files with no annotations.
Metrics that compare annotations (``USES_LABELS``, e.g. ``label_aware``) are skipped, with a one-line note,
when a dataset has none. Every table, plot and the JSON say how many images each dataset contributed.
"""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from megatron.commands.common import COMBINE_HELP, add_config_arguments, config_from_args, config_option

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs") / "similarity"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similarity", conflict_handler="resolve",
        help="rank the source datasets by similarity to the target (tables, heatmaps, histograms, t-SNE)",
        description="Measure how close each source dataset is to the target under each similarity metric "
        "(built-in suite by default, the configured datasets otherwise; or folders of unannotated images / DICOM "
        "files: --folders DIR ... --target DIR). Prints one ranking table per metric, with the images each "
        "dataset contributed, "
        "and writes PNGs: averaged histograms, a distance heatmap per metric, a t-SNE of CNN embeddings. "
        "Metric options come from the config's `similarity.options.<metric>` (or --set). " + COMBINE_HELP,
    )
    add_config_arguments(p)
    config_option(p, "--target", key="data.target", help="target task name; with --folders: the target folder")
    p.add_argument("--folders", nargs="+", metavar="DIR",
                   help="rank these folders of unannotated images / DICOM files (searched recursively) against "
                   "--target DIR instead of the configured datasets; each folder is one dataset named after it")
    p.add_argument("--window", default="file", metavar="file|none|CENTER,WIDTH",
                   help="with --folders: how DICOM grayscale is windowed (the file's first window by default; see "
                   "the `dicom` dataset plugin)")
    config_option(p, "--metrics", key="similarity.metrics", type=_names, help="comma-separated metric names")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    # replaces the config's --out (output.dir): this command writes pictures, not runs
    p.add_argument("--out", dest="similarity_out", metavar="DIR", default=str(DEFAULT_OUT),
                   help=f"folder for the PNGs and similarity.json (default: {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.set_defaults(func=_run)


def _names(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated metric names, e.g. wasserstein,embedding")
    return names


def parse_window(text: str):
    """``file`` | ``none`` | ``CENTER,WIDTH`` -> a :class:`~megatron.data.dicom.DicomDisplay`."""
    from megatron.data.dicom import DicomDisplay
    from megatron.errors import ConfigError

    text = str(text).strip()
    if text in ("file", "none"):
        return DicomDisplay(window=text)
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected file, none or CENTER,WIDTH (e.g. 40,400)") from None
    return DicomDisplay(window=(center, width))


def folder_tasks(folders: list[str], target: str, display=None) -> tuple[Any, list[Any]]:
    """``(target task, source tasks)`` from folders of unannotated images / DICOM files; each task is named
    after its folder (with its parent when two folders share a name)."""
    from megatron.data.dicom import DEFAULT_DISPLAY
    from megatron.data.folder import read_image_folder
    from megatron.data.problems import raise_for_errors
    from megatron.errors import ConfigError

    target_path = Path(target).expanduser()
    paths = [target_path] + [q for q in (Path(f).expanduser() for f in folders)
                             if q.resolve() != target_path.resolve()]
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    if len(unique) < 2:
        raise ConfigError("similarity --folders: give at least one folder besides the --target folder to compare "
                          "with, e.g. `megatron similarity --folders data/xray data/mri --target data/new`")
    names = _folder_names(unique)
    tasks = []
    for path, name in zip(unique, names):
        if not path.is_dir():
            raise ConfigError(f"similarity --folders: {path} is not a folder; fix: pass folders of images or DICOM "
                              "files")
        task, problems = read_image_folder(path, name, display=display or DEFAULT_DISPLAY, source=f"folder:{path}")
        raise_for_errors(problems, str(path))
        tasks.append(task)
    return tasks[0], tasks[1:]


def _folder_names(paths: list[Path]) -> list[str]:
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def images_used(metric, task) -> int:
    """How many images of ``task`` the metric's summary rests on (sampled, minus any it had to skip)."""
    from megatron.similarity import summarize_cached

    summary = summarize_cached(metric, task)[0]
    ids = getattr(summary, "image_ids", None)
    if ids is not None:
        return max(len(ids) - int(getattr(summary, "n_skipped", 0) or 0), 0)
    n = getattr(metric.options, "sample_size", None)
    return min(int(n), len(task)) if n else len(task)


def compute(cfg, pm, target_name: str, metric_names: list[str], progress=None) -> tuple[dict[str, Any], dict]:
    """Pairwise distances and the target's ranking per metric over the configured datasets. Returns
    ``(result, metrics)``: the JSON-able result and the metric objects (their cached summaries feed the plots)."""
    from megatron.errors import ConfigError
    from megatron.experiment import load_tasks

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
    return compute_tasks(cfg, pm, by_name[target_name], [by_name[n] for n in source_names], metric_names, progress)


def compute_tasks(cfg, pm, target, sources: list, metric_names: list[str], progress=None) -> tuple[dict[str, Any], dict]:
    """:func:`compute` on given tasks. Metrics with ``USES_LABELS`` are skipped when a task has no boxes
    (``result["skipped"]``: metric -> reason). Each metric's entry holds ``images``: task -> images used."""
    from megatron.errors import ConfigError
    from megatron.similarity import build_metric, pairwise_distances
    from megatron.similarity.selection import similarity_context
    from megatron.runtime.environment import resolve_device
    from megatron.types import Task

    ordered = [target, *sources]
    unlabelled = [t.name for t in ordered if not any(len(r.boxes) for r in t.records)]
    skipped: dict[str, str] = {}
    kept = []
    for name in metric_names:
        try:
            cls = pm.registers["similarity"].get(name)
        except KeyError as exc:
            raise ConfigError(f"similarity metric: {exc}") from None
        if getattr(cls, "USES_LABELS", False) and unlabelled:
            skipped[name] = (f"compares annotations, and {', '.join(unlabelled)} "
                             f"{'has' if len(unlabelled) == 1 else 'have'} none")
        else:
            kept.append(name)
    if not kept:
        raise ConfigError(f"similarity: every metric asked for ({', '.join(metric_names)}) compares annotations, "
                          f"which {', '.join(unlabelled)} lack; fix: use an image-only metric, e.g. --metrics "
                          "wasserstein,embedding")
    device = resolve_device(cfg.training.device)
    # the detector's head size comes from the sources' classes; unlabelled folders have none (features only)
    labelled = [t for t in ordered[1:] if t.categories] or [Task(name="unlabelled", categories=["object"], records=[])]
    ctx = similarity_context(cfg, pm, labelled, device)
    result: dict[str, Any] = {"target": target.name, "sources": [t.name for t in sources], "metrics": {}}
    if skipped:
        result["skipped"] = skipped
    metrics = {}
    for name in kept:
        metric = build_metric(pm, cfg, name, ctx)
        names, matrix, timings = pairwise_distances(metric, ordered, progress=progress)
        ranking = sorted(((names[j], float(matrix[0, j])) for j in range(1, len(names))), key=lambda r: (r[1], r[0]))
        result["metrics"][name] = {
            "unit": metric.unit, "note": metric.describe(),
            "images": {t.name: images_used(metric, t) for t in ordered},
            "ranking": [{"rank": i + 1, "name": n, "distance": d} for i, (n, d) in enumerate(ranking)],
            "pairwise": {"names": names, "distances": matrix.round(6).tolist()},
            "timings": {k: v for k, v in timings.items()},
        }
        metrics[name] = (metric, ordered)
    return result, metrics


def images_caption(images: dict[str, int]) -> str:
    """``images per dataset: eit 1, xray 50`` (what the numbers rest on)."""
    return "images per dataset: " + ", ".join(f"{name} {count}" for name, count in images.items())


def write_plots(result: dict[str, Any], metrics: dict, out: Path, seed: int) -> list[str]:
    from megatron.similarity import summarize_cached
    from megatron.similarity.plots import plot_heatmap, plot_histograms, plot_tsne

    written = []
    for name, entry in result["metrics"].items():
        pw = entry["pairwise"]
        counts = entry.get("images")
        written.append(plot_heatmap(pw["names"], np.asarray(pw["distances"]), name, entry["unit"],
                                    out / f"heatmap_{name}.png", counts=counts))
        metric, tasks = metrics[name]
        summaries = {t.name: summarize_cached(metric, t)[0] for t in tasks}
        first = next(iter(summaries.values()))
        if hasattr(first, "hist") and hasattr(first, "centres"):
            written.append(plot_histograms({n: (s.centres, s.hist) for n, s in summaries.items()},
                                           out / f"histograms_{name}.png", counts=counts))
        if hasattr(first, "features") and sum(len(s.features) for s in summaries.values()) >= 5:
            written.append(plot_tsne({n: s.features for n, s in summaries.items()}, out / f"tsne_{name}.png",
                                     seed=seed, note=entry["note"]))
    return [str(p) for p in written]


def _run(args: argparse.Namespace) -> int:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from megatron import get_plugin_manager
    from megatron.runtime.console import output_console, print_full_width
    from megatron.atomic_io import atomic_write_json

    from megatron.errors import ConfigError

    cfg = config_from_args(args)
    metric_names = list(cfg.similarity.metrics)
    pm = get_plugin_manager()
    console = output_console(stderr=args.json)
    if args.folders and args.target is None:
        raise ConfigError("similarity --folders needs --target DIR, the folder of the new images to rank the others "
                          "against")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        job = bar.add_task("loading datasets", total=None)
        report = lambda text: bar.update(job, description=text)  # noqa: E731
        if args.folders:
            target_task, sources = folder_tasks(args.folders, args.target, parse_window(args.window))
            result, metrics = compute_tasks(cfg, pm, target_task, sources, metric_names, progress=report)
        else:
            result, metrics = compute(cfg, pm, cfg.data.target, metric_names, progress=report)
        target = result["target"]
        out = Path(args.similarity_out)
        if not args.no_plots:
            bar.update(job, description="writing plots")
            result["plots"] = write_plots(result, metrics, out, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "similarity.json", result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, reason in result.get("skipped", {}).items():
        console.print(f"note: {name} skipped: it {reason}", highlight=False)
    for name, entry in result["metrics"].items():
        table = Table(title=f"{name}: sources ranked by distance to {target!r} (smaller = more similar)",
                      caption=f"{entry['note']}\n{images_caption(entry['images'])}")
        table.add_column("rank", justify="right")
        table.add_column("source")
        table.add_column(f"distance ({entry['unit']})", justify="right")
        table.add_column("images", justify="right")
        for row in entry["ranking"]:
            table.add_row(str(row["rank"]), row["name"], f"{row['distance']:.4g}", str(entry["images"][row["name"]]))
        print_full_width(console, table)
        t = entry["timings"]
        console.print(f"  time: summarising (decoding, features) {t['summarize_s']:.2f}s, "
                      f"distances {t['distance_s']:.3f}s over {t['n_pairs']} pairs", highlight=False)
    console.print(f"wrote {out / 'similarity.json'}" + (f" and {len(result.get('plots', []))} PNGs" if not args.no_plots else ""),
                  highlight=False)
    return 0
