"""``megatron data``: ``check PATH`` validates and summarises a dataset; ``export NAME --out DIR`` writes a
dataset plugin's tasks (by default the built-in ``medsynth`` suite) as COCO folders."""
from __future__ import annotations

# lazy imports: start-up time (heavy modules are imported inside the command functions; see megatron/commands/__init__.py)

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from megatron.errors import ConfigError, MegatronError, PluginError
from megatron.commands.common import parse_set_options
from megatron.runtime.console import output_console, print_full_width


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check a dataset, or export a dataset plugin's tasks as COCO folders",
                       description="Dataset tools: `megatron data check PATH` and `megatron data export medsynth --out DIR`.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    c = dsub.add_parser("check", help="validate a dataset (COCO, YOLO, DICOM, image folder, or every dataset of a "
                        "config) and print a summary",
                        description="Read a dataset the way its plugin does, open every image and print counts, "
                        "boxes per class, box- and image-size distributions, pixel types and every problem found "
                        "(file, record, fix). PATH is checked as a COCO/YOLO dataset or a folder of DICOM files or "
                        "images; -c CONFIG checks every dataset of the config through its plugin (third-party "
                        "plugins too). Exit code 1 when errors were found.")
    c.add_argument("path", nargs="?", help="COCO annotation file, COCO folder (annotations.json or "
                   "annotations/*.json), YOLO folder (images/ + labels/), or a folder of DICOM files / images")
    c.add_argument("-c", "--config", metavar="FILE", help="check every dataset of this experiment config instead")
    c.add_argument("--format", choices=["coco", "yolo", "dicom", "folder"], help="dataset layout (default: detected)")
    c.add_argument("--image-dir", help="COCO: folder the file_name paths are relative to (default: images/ beside "
                   "the annotation file, else its folder)")
    c.add_argument("--split", help="YOLO: sub-folder of images/ and labels/ to check (e.g. train)")
    c.add_argument("--input-size", type=int, default=None, metavar="PX", help="PATH: the detector input size the "
                   "box sizes are measured at (default: data.input_size's default; -c uses the config's)")
    c.add_argument("--stride", type=int, default=None, metavar="PX", help="PATH: the detector's smallest stride "
                   "(default 8, YOLOX; faster-rcnn: 4; -c asks the configured detector)")
    c.add_argument("--allow-outside-paths", action="store_true", help="PATH: read image paths that leave the image "
                   "folder (absolute, ../, symlinks); by default each is an error (-c: the dataset option "
                   "allow_outside_paths)")
    c.add_argument("--group-pattern", metavar="REGEX", help="PATH: the patient of each image from "
                   "its path under the dataset (the regex's first group, e.g. '^([^/]+)/' for one sub-folder per "
                   "patient), as the dataset option group_pattern")
    c.add_argument("--groups-csv", metavar="FILE", help="PATH: a CSV of file_name,patient_id, as the "
                   "dataset option groups_csv")
    c.add_argument("--group-field", metavar="NAME", help="PATH, COCO: the image-entry field naming the patient "
                   "(default patient_id), as the dataset option group_field")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--show", type=int, default=30, metavar="N", help="list at most N problems (default 30; --json lists all)")
    c.set_defaults(func=_check)

    e = dsub.add_parser("export", help="write a dataset plugin's tasks as COCO folders (default: medsynth)",
                        description="Write every task of a dataset plugin as DIR/<task>/images/ + annotations.json, "
                        "a COCO folder any COCO tool (and the `coco` plugin) can open.")
    e.add_argument("name", nargs="?", default="medsynth", help="dataset plugin name (default: medsynth)")
    e.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a plugin option, e.g. --set seed=1 --set images_per_task=50 (value parsed as YAML); repeatable")
    e.set_defaults(func=_export)


def _check(args: argparse.Namespace) -> int:
    from megatron.data.check import check_dataset, report_json

    if (args.path is None) == (args.config is None):
        raise ConfigError("data check: give a dataset PATH or -c CONFIG (one of them); e.g. `megatron data check "
                          "data/eit` or `megatron data check -c experiment.yaml`")
    if args.config is not None:
        return _check_config(args)
    console = output_console()
    measure = {k: v for k, v in (("input_size", args.input_size), ("stride", args.stride)) if v is not None}
    measure["allow_outside_paths"] = args.allow_outside_paths
    measure.update({k: v for k, v in (("group_pattern", args.group_pattern), ("groups_csv", args.groups_csv),
                                      ("group_field", args.group_field)) if v is not None})
    if args.json:
        report = check_dataset(Path(args.path), args.format, args.image_dir, args.split, **measure)
        print(report_json(report))
        return 0 if report.ok else 1
    with _progress(console) as progress:
        bar = progress.add_task("opening images", total=None)
        report = check_dataset(Path(args.path), args.format, args.image_dir, args.split,
                               progress=lambda done, total: progress.update(bar, completed=done, total=total), **measure)
    print_report(report, console, args.show)
    return 0 if report.ok else 1


def _check_config(args: argparse.Namespace) -> int:
    import json

    from megatron import get_plugin_manager
    from megatron.config import load_config
    from megatron.data.check import check_config

    cfg = load_config(args.config, {})
    pm = get_plugin_manager()
    if args.json:
        reports = check_config(cfg, pm)
        print(json.dumps({"config": args.config, "ok": all(r.ok for r in reports),
                          "datasets": [r.to_dict() for r in reports]}, indent=2))
        return 0 if all(r.ok for r in reports) else 1
    console = output_console()
    with _progress(console) as progress:
        bar = progress.add_task("reading", total=None)
        reports = check_config(cfg, pm, progress=lambda done, total: progress.update(bar, completed=done, total=total),
                               on_dataset=lambda label: progress.update(bar, description=f"{label}: opening images",
                                                                        completed=0, total=None))
    for report in reports:
        print_report(report, console, args.show)
        console.print()
    bad = [r for r in reports if not r.ok]
    verdict = "[green]OK[/]" if not bad else f"[red]{len(bad)} of {len(reports)} dataset(s) with errors[/]"
    console.print(f"config {escape(args.config)}: {len(reports)} dataset(s) checked, {verdict}", highlight=False,
                  soft_wrap=True)
    return 0 if not bad else 1


def print_report(report, console: Console, show: int = 30) -> None:
    from megatron.data.check import patient_and_size_lines

    console.print(f"[bold]{report.path}[/] ({report.format}) task [cyan]{report.task_name or '-'}[/]", highlight=False)
    if report.n_images:
        overview = Table(title="dataset", show_header=False)
        overview.add_row("images", str(report.n_images))
        overview.add_row("boxes", str(report.n_boxes))
        overview.add_row("images without boxes", str(report.images_without_boxes))
        overview.add_row("pixel types", ", ".join(f"{k}: {v}" for k, v in report.pixel_types.items()) or "-")
        sizes = list(report.image_sizes.items())
        overview.add_row("image sizes", ", ".join(f"{k}: {v}" for k, v in sizes[:6]) +
                         (f" (+{len(sizes) - 6} more)" if len(sizes) > 6 else ""))
        console.print(overview)
        for line in patient_and_size_lines(report):
            console.print(escape(line), highlight=False, soft_wrap=True)
        if report.categories:  # unannotated folders (similarity only) have no classes
            classes = Table(title="boxes per class")
            classes.add_column("class")
            classes.add_column("boxes", justify="right")
            for name, n in report.boxes_per_class.items():
                classes.add_row(name, str(n) if n else "[yellow]0[/]")
            console.print(classes)
        else:
            console.print("no annotations: an image-only dataset (for `megatron similarity`; `run` needs boxes)")
        dist = Table(title="distributions (quantiles)")
        dist.add_column("")
        keys = list(report.box_sqrt_area_px or report.image_width)
        for k in keys:
            dist.add_column(k, justify="right")
        for label, q, fmt in (("boxes per image", report.boxes_per_image, "{:.0f}"),
                              ("box sqrt(area) px", report.box_sqrt_area_px, "{:.1f}"),
                              ("box sqrt(area) / sqrt(image area)", report.box_relative_size, "{:.3f}"),
                              ("image width px", report.image_width, "{:.0f}"),
                              ("image height px", report.image_height, "{:.0f}")):
            if q:
                dist.add_row(label, *(fmt.format(q[k]) for k in keys))
        console.print(dist)
    if report.problems:
        # one line per problem rather than a table: messages and fixes are long and must not be cut
        console.print(f"[bold]problems[/]: {len(report.errors)} error(s), {len(report.warnings)} warning(s)")
        ordered = report.errors + report.warnings
        for p in ordered[:show]:
            colour = "red" if p.severity == "error" else "yellow"
            where = f"{p.file} [{p.record}]" if p.record else p.file
            console.print(f"  [{colour}]{p.severity}[/] {escape(where)}: {escape(p.message)}\n"
                          f"    [dim]fix:[/] {escape(p.fix)}", highlight=False, soft_wrap=True)
        counts = report.to_dict()["warning_counts"]
        if counts:
            console.print("  warnings by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        if len(ordered) > show:
            console.print(f"  ... {len(ordered) - show} more (use --show N or --json)")
    verdict = "[green]OK[/]" if report.ok else f"[red]{len(report.errors)} error(s)[/]"
    console.print(f"check: {verdict}, {len(report.warnings)} warning(s)")


def _export(args: argparse.Namespace) -> int:
    from megatron import get_plugin_manager
    from megatron.config import validate_plugin_options
    from megatron.data.coco import write_coco_task

    pm = get_plugin_manager()
    try:
        cls = pm.registers["dataset"].get(args.name)
    except KeyError as exc:
        raise ConfigError(f"data export: {exc}") from None
    options = validate_plugin_options(cls, parse_set_options(args.set), f"data export {args.name} --set")
    try:
        tasks = cls(options).load()
    except MegatronError:
        raise
    except Exception as exc:  # a plugin bug or unconverted bad input: named, not a raw traceback
        raise PluginError(f"dataset plugin {args.name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    out = Path(args.out)
    console = output_console()
    table = Table(title=f"exported {args.name} -> {out}")
    for col in ("task", "modality", "images", "boxes", "classes"):
        table.add_column(col)
    with _progress(console) as progress:
        bar = progress.add_task("writing", total=len(tasks))
        for task in tasks:
            folder = out / task.name
            write_coco_task(task, folder)
            progress.advance(bar)
            table.add_row(task.name, task.modality, str(len(task)), str(sum(len(r.boxes) for r in task.records)),
                          ", ".join(task.categories))
    print_full_width(console, table)
    console.print(f"check one with: megatron data check {out / tasks[0].name}" if tasks else "no tasks")
    return 0


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)
