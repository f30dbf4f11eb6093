"""The run record: one self-describing JSON file per run (``run.json``) that reports and benchmarks read.

It holds the effective config, the software and hardware versions, the seed, the task set, the source
selection (when one was made), and per learner the metrics of every evaluation, the compute spent and why
training stopped. All metrics are fractions in ``0..1``. The file is written atomically, so a killed run
leaves the last complete version behind.
"""
from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from megatron.atomic_io import atomic_write_json
from megatron.errors import DataError
from megatron.evaluation.metric_names import REPORTED_METRICS as TABLE_METRICS  # noqa: F401 - read here too
from megatron.evaluation.operating_point import describe as describe_operating_point
from megatron.training.run_files import (  # noqa: F401 - importers read the file names here too
    CONFIG_FILE, CURVE_FILE, FROC_FILE, RECORD_FILE, SUMMARY_FILE,
)

_PACKAGES = ("torch", "torchvision", "mmdet", "mmcv", "mmengine", "numpy")


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def collect_versions(device: torch.device, cfg: Any = None, pm: Any = None,
                     learners: list[str] | None = None) -> dict[str, Any]:
    """Python, the numeric/detection packages, the platform, the CPU, the device and torch's thread count; with
    ``cfg`` and ``pm`` also ``plugins``: every plugin the run uses (:func:`collect_plugin_versions`)."""
    versions: dict[str, Any] = {"python": sys.version.split()[0]}
    for package in _PACKAGES:
        versions[package] = package_version(package)
    versions["platform"] = platform.platform()
    versions["cpu"] = _cpu_name()
    versions["device"] = describe_device(device)
    versions["threads"] = torch.get_num_threads()
    if cfg is not None and pm is not None:
        versions["plugins"] = collect_plugin_versions(cfg, pm, learners)
    return versions


_REGISTRATION_HOOKS = ("megatron_register_",)


def collect_plugin_versions(cfg: Any, pm: Any, learners: list[str] | None = None) -> list[dict[str, Any]]:
    """One entry per plugin class the run uses — the configured dataset plugins, the detector, the learners
    (``learners``, default ``learner.name``; the baseline included when given), the similarity metric when
    sources are selected, the loggers — and per plugin that implements a lifecycle hook (it is called during
    the run, so it may change what is written): ``{kind, name, plugin, package, version, builtin}``."""
    used: list[tuple[str, str]] = [("dataset", spec.plugin) for spec in cfg.data.datasets]
    used.append(("detector", cfg.detector.name))
    used += [("learner", name) for name in (learners or [cfg.learner.name])]
    if getattr(cfg.similarity, "select_sources", None):
        used.append(("similarity", cfg.similarity.metric))
    used += [("logger", spec.name) for spec in getattr(cfg, "loggers", None) or []]
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def entry(kind: str, name: str, plugin: str) -> dict[str, Any]:
        info = pm.info.get(plugin)
        return {"kind": kind, "name": name, "plugin": plugin, "package": info.package if info else "?",
                "version": info.version if info else "?", "builtin": bool(info.builtin) if info else False}

    for kind, name in used:
        reg = pm.registers.get(kind)
        if reg is None or name not in reg or (kind, name) in seen:
            continue
        seen.add((kind, name))
        out.append(entry(kind, name, reg.owner(name)))
    for plugin_name, plugin in pm.list_name_plugin():
        if plugin_name not in pm.info:  # logger instances registered for the run: their class is listed above
            continue
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [] if not h.name.startswith(_REGISTRATION_HOOKS))
        if hooks:
            out.append({**entry("hooks", plugin_name, plugin_name), "hooks": hooks})
    return out


def write_record(run_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(run_dir) / RECORD_FILE
    atomic_write_json(path, record)
    return path


def load_record(path: str | Path) -> dict[str, Any]:
    """Read a run record from ``path`` (the ``run.json`` file or its run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no run record here; run `megatron run` first or pass the run directory") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not a valid run record (JSON error at line {exc.lineno}: {exc.msg})") from None
    if not isinstance(record, dict) or "learners" not in record:
        raise DataError(f"{path}: not a megatron run record (no 'learners' section)")
    return record


def summary_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per learner: its final metrics, compute spent, meta-epochs run and baseline-equivalent epochs."""
    rows = []
    for name, lrec in record.get("learners", {}).items():
        final = lrec.get("final") or {}
        rows.append({
            "learner": name,
            **{key: final.get(key) for key, _ in TABLE_METRICS},
            "compute": (lrec.get("compute") or {}).get("spent"),
            "meta_epochs": len(lrec.get("epochs", [])),
            "baseline_equivalent_epochs": lrec.get("baseline_equivalent_epochs"),
            "stopped_by": lrec.get("stopped_by"),
        })
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def operating_point_lines(record: dict[str, Any]) -> list[str]:
    """Per learner, the held-out precision / recall / F1 and FROC point at the operating point chosen on
    validation (of the validation-chosen model, else the final one), beside the fixed-threshold figures."""
    ev = (record.get("config") or {}).get("evaluation") or {}
    fixed = float(ev.get("score_threshold", 0.3))
    lines = []
    for name, lrec in record.get("learners", {}).items():
        metrics = lrec.get("best") or lrec.get("final") or {}
        point = metrics.get("operating_point")
        if not point:
            continue
        lines.append(f"- {name}: {describe_operating_point(point, fixed)} → held-out precision "
                     f"{_fmt(point.get('precision'))}, recall {_fmt(point.get('recall'))}, F1 {_fmt(point.get('F1'))}; "
                     f"FROC point {_fmt(point.get('fp_per_image'))} false positives per image at sensitivity "
                     f"{_fmt(point.get('sensitivity'))}")
    if not lines:
        return []
    return ["", f"Operating point (the table's precision / recall / F1 are at the fixed score >= {fixed:g}):", "",
            *lines]


def summary_markdown(record: dict[str, Any]) -> str:
    """The summary table as Markdown (also what ``megatron run`` prints, in rich form)."""
    head = ["learner", *(title for _, title in TABLE_METRICS), "compute (image passes)", "meta-epochs",
            "baseline-equiv. epochs", "stopped by"]
    lines = [
        f"# Run summary — target `{record.get('target')}`, K = {record.get('shots')} shots, seed {record.get('seed')}",
        "",
        f"Sources: {', '.join(record.get('sources', []))}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in summary_rows(record):
        cells = [row["learner"], *(_fmt(row[k]) for k, _ in TABLE_METRICS), _fmt(row["compute"]),
                 _fmt(row["meta_epochs"]), _fmt(row["baseline_equivalent_epochs"]), _fmt(row["stopped_by"])]
        lines.append("| " + " | ".join(cells) + " |")
    best = [(name, lrec["best"]) for name, lrec in record.get("learners", {}).items() if lrec.get("best")]
    for name, b in best:
        cells = [f"{name} (best on validation, meta-epoch {b.get('meta_epoch')})",
                 *(_fmt(b.get(k)) for k, _ in TABLE_METRICS), "", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    if best:
        lines += ["", f"'best on validation': the held-out metrics of the meta-epoch whose adapted model scored highest "
                      f"on the validation split ({record.get('validation_images')} images, never trained on); that "
                      "model is models/<learner>-best.pth, the last one models/<learner>-final.pth."]
    lines += operating_point_lines(record)
    pre = record.get("pretrain") or {}
    if pre:
        lines += ["", f"Stage 1 (pre-training on the sources): {pre.get('source', '')}"
                      f"{': ' + str(pre['checkpoint']) if pre.get('checkpoint') else ''}."]
    if record.get("split"):
        split = record["split"]
        sizes = {k: len(v) for k, v in split.items() if isinstance(v, list)}
        patients = split.get("patients") or {}
        grouping = (f" Patients (groups: {split['grouping']}): pool {patients.get('pool')}, validation "
                    f"{patients.get('validation')}, held-out {patients.get('heldout')}; none is in two parts."
                    if split.get("grouping") else "")
        lines += ["", f"Target split (image ids in run.json): pool {sizes.get('pool')}, validation "
                      f"{sizes.get('validation')}, held-out {sizes.get('heldout')}.{grouping}"]
    if record.get("comparison"):
        lines += ["", f"Comparison: {record['comparison'].get('how', '')}"]
    if record.get("selection"):
        lines += ["", f"Source selection: {record['selection'].get('reason', '')}"]
    lines += ["", "Metrics are on the target's held-out split (never used for training); fractions in 0..1. FROC: "
              "mean lesion sensitivity at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image."]
    return "\n".join(lines) + "\n"
