"""Benchmark results as rows: loading cell records (``<dir>/cells/<cell-id>/run.json`` + ``cell.json``, or
plain run directories), merging copies of one cell, and the settings rows are grouped by. Shared by the
report (:mod:`.report`) and its plots (:mod:`.plots`), which therefore do not import each other."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from megatron.errors import MegatronError
from megatron.api.learner import BASELINE_LEARNER as BASELINE  # noqa: F401 - the report and plots read it here
from megatron.evaluation.metric_names import METRIC_KEYS as METRICS, METRIC_LABELS  # noqa: F401 - report, plots
from megatron.training.run_files import CELL_FILE, RECORD_FILE

# FROC is absent (None) in records made before it existed, which then simply have no FROC interval
POINTS = 100.0  # fractions -> points
UNIT = "points (x100 of a fraction in 0..1; 1 point = 0.01 mAP)"
CSV_COLUMNS = ("cell_id", "learner", "learner_plugin", "control", "seed", "n_sources", "n_tasks", "sources", "shots",
               "lr", "lr_scale", "selection", "detector", "target", "status", "model", "selected_epoch", *METRICS,
               "final_mAP50", "compute_spent", "compute_budget", "stopped_by", "unequal_compute", "baseline_equivalent_epochs",
               "n_epochs", "wall_s", "op_threshold", "op_chosen_on", "op_precision", "op_recall", "op_F1",
               "op_fp_per_image", "epochs")

#: which adapted model of a cell the metrics describe. ``selected``: the one chosen on the target's validation
#: split (the meta-epoch with the best validation mAP50; its metrics are on the held-out test split, which the
#: choice never saw) — what a user deploys; and since each meta-epoch's adaptation to K images is a fresh draw,
#: the last one adds noise of its own to every paired difference, which the choice mostly removes (experiment 4:
#: sd of reptile - finetune 16 points final, 3.9 selected). ``final``: the model after the last meta-epoch.
MODELS = ("selected", "final")
DEFAULT_MODEL = "selected"


class ReportError(MegatronError):
    """Records that cannot be turned into a report (none found, unreadable)."""


# ------------------------------------------------------------------------------------------------------- loading
def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ReportError(unreadable_json(path, exc)) from None


def unreadable_json(path: Path, exc: Exception) -> str:
    """The one message (and fix) for a benchmark file that is not valid JSON, whoever finds it (the report or
    the benchmark itself): a cell's file -> delete the cell's folder and run the benchmark again (that cell
    alone is re-run); the grid's benchmark.json -> run the benchmark again (it rewrites the file)."""
    path = Path(path)
    if path.parent.parent.name == "cells":
        fix = (f"delete that cell's folder {path.parent} and run the same `megatron benchmark` again: it re-runs "
               "that cell alone, then writes the report")
    else:
        fix = f"run the same `megatron benchmark` with --out {path.parent} again: it rewrites {path.name}"
    return f"{path}: not valid JSON ({exc}). Fix: {fix}"


def _cell_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise ReportError(f"{root}: no such directory (expected a `megatron benchmark` --out folder)")
    if (root / RECORD_FILE).exists() or (root / CELL_FILE).exists():
        return [root]
    base = root / "cells" if (root / "cells").is_dir() else root
    return sorted(p for p in base.iterdir() if p.is_dir() and ((p / RECORD_FILE).exists() or (p / CELL_FILE).exists()))


def _learner_record(rec: dict, plugin: str) -> dict | None:
    learners = rec.get("learners") or {}
    if plugin in learners:
        return learners[plugin]
    if len(learners) == 1:
        return next(iter(learners.values()))
    return None


def _epochs(lrec: dict) -> list[dict]:
    """Per-epoch metrics with cumulative compute (the record may hold per-epoch or cumulative counts)."""
    eps = lrec.get("epochs") or []
    spent = [float((e.get("compute") or {}).get("spent") or 0) for e in eps]
    total = float((lrec.get("compute") or {}).get("spent") or 0)
    cumulative = bool(spent) and abs(spent[-1] - total) <= max(1.0, 1e-6 * total) and all(
        b >= a for a, b in zip(spent, spent[1:]))
    out, acc = [], 0.0
    for i, e in enumerate(eps):
        acc = spent[i] if cumulative else acc + spent[i]
        m = e.get("metrics") or {}
        out.append({"meta_epoch": e.get("meta_epoch", i + 1), "compute_spent": acc, "train_loss": e.get("train_loss"),
                    **{k: m.get(k) for k in METRICS}})
    return out


def _model_metrics(lrec: dict | None, model: str) -> tuple[dict, str | None, int | None]:
    """(metrics, model used, its meta-epoch) of a learner record. ``selected`` falls back to ``final`` for a
    record without a validation choice (no validation split, or made before it existed)."""
    if model not in MODELS:
        raise ReportError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    final = (lrec or {}).get("final") or {}
    best = (lrec or {}).get("best") or {}
    if model == "selected" and best.get("mAP50") is not None:
        return best, "selected", best.get("meta_epoch")
    if not final:
        return {}, None, None
    return final, "final", len((lrec or {}).get("epochs") or []) or None


def row_from_record(cell_dir: Path, rec: dict | None, cell: dict | None, model: str = DEFAULT_MODEL) -> dict:
    """One results row from a cell's record and (optional) cell definition; the metrics are those of ``model``
    (see :data:`MODELS`)."""
    cfg = (rec or {}).get("config") or {}
    plugin = (cell or {}).get("learner_name") or (cfg.get("learner") or {}).get("name") or "?"
    label = (cell or {}).get("learner") or plugin
    lrec = _learner_record(rec, plugin) if rec else None
    final = (lrec or {}).get("final") or {}
    metrics, used, epoch = _model_metrics(lrec, model)
    sources = (rec or {}).get("sources")
    if sources is None and cell:
        sources = cell.get("sources")
    selection = (cell or {}).get("selection") or ("closest" if (rec or {}).get("selection") else "given")
    compute = (lrec or {}).get("compute") or {}
    epochs = _epochs(lrec) if lrec else []
    wall = (rec or {}).get("wall_s")
    if wall is None and lrec:
        wall = sum(float(e.get("wall_s") or 0) for e in lrec.get("epochs") or [])
    status = (rec or {}).get("status") or ("failed" if (cell_dir / "error.txt").exists() else "not started")
    if status == "complete" and not lrec:
        status = "incomplete record"
    return {
        "cell_id": (cell or {}).get("id") or cell_dir.name,
        "learner": label, "learner_plugin": plugin,
        "control": (cell or {}).get("control"),  # "positive" | "negative": the power check's cells
        "seed": (cell or {}).get("seed", (rec or {}).get("seed", cfg.get("seed"))),
        "n_sources": (cell or {}).get("n_sources") if cell else None,
        "n_tasks": len(sources) if sources is not None else None,
        "sources": list(sources) if sources is not None else None,
        "shots": (cell or {}).get("shots", (rec or {}).get("shots", (cfg.get("data") or {}).get("shots"))),
        "lr": (cell or {}).get("lr"),
        "lr_scale": bool((cell or {}).get("lr_scale")),  # lr is a multiplier of the base config's rates
        "selection": selection,
        "detector": (cell or {}).get("detector") or (cfg.get("detector") or {}).get("name"),
        "target": (rec or {}).get("target") or (cfg.get("data") or {}).get("target"),
        "status": status,
        "model": used, "selected_epoch": epoch,
        **{k: metrics.get(k) for k in METRICS},
        "final_mAP50": final.get("mAP50"),
        **operating_point_fields(metrics),
        "compute_spent": compute.get("spent"),
        "compute_budget": compute.get("budget", (cell or {}).get("budget")),
        "stopped_by": (lrec or {}).get("stopped_by"),
        # the run marked this learner short of its budget (megatron.training.meta_train.compute_equality): the
        # reason; such a cell is left out of the verdicts
        "unequal_compute": _unequal_reason(lrec),
        "baseline_equivalent_epochs": (lrec or {}).get("baseline_equivalent_epochs"),
        "n_epochs": len(epochs),
        "wall_s": wall,
        "reused_from": (rec or {}).get("reused_from"),  # the identical cell of another grid it was taken from
        "epochs": epochs,
        "_dir": str(cell_dir),
    }


def _unequal_reason(lrec: dict | None) -> str | None:
    eq = (lrec or {}).get("equal_compute") or {}
    return (eq.get("reason") or "short of its compute budget") if eq.get("equal") is False else None


def operating_point_fields(metrics: dict) -> dict:
    """The operating point of a model's held-out metrics (chosen on validation; absent in older records):
    its threshold, where it came from, and precision, recall, F1 and false positives per image at it."""
    point = metrics.get("operating_point") or {}
    return {"op_threshold": point.get("threshold"), "op_chosen_on": point.get("chosen_on"),
            **{f"op_{k}": point.get(k) for k in ("precision", "recall", "F1", "fp_per_image")}}


@dataclass
class Loaded:
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)  # one complete record, for versions/config
    benchmark: list[dict] = field(default_factory=list)  # benchmark.json of each directory


def load_rows(dirs: Iterable[str | Path], model: str = DEFAULT_MODEL) -> Loaded:
    """Every cell of every directory, identical cells counted once; metrics of ``model`` (:data:`MODELS`)."""
    loaded = Loaded([])
    by_id: dict[str, dict] = {}
    for d in dirs:
        d = Path(d)
        bj = _read(d / "benchmark.json") if d.is_dir() else None
        if bj:  # one grid's description, or a list of them (a merged, self-contained report folder)
            loaded.benchmark.extend(bj if isinstance(bj, list) else [bj])
        for cdir in _cell_dirs(d):
            rec = _read(cdir / RECORD_FILE)
            cell = _read(cdir / CELL_FILE)
            if cell is None and rec and len(rec.get("learners") or {}) > 1:
                # a `megatron run` directory with its baseline: one row per learner
                cells = [{"id": f"{cdir.name}:{name}", "learner": name, "learner_name": name}
                         for name in rec["learners"]]
            else:
                cells = [cell]
            for c in cells:
                row = row_from_record(cdir, rec, c, model)
                if rec and row["status"] == "complete" and not loaded.records:
                    loaded.records.append(rec)
                _merge(by_id, row, loaded.warnings)
    loaded.rows = sorted(by_id.values(), key=lambda r: (r["learner"], _skey(setting_of(r)), str(r["seed"])))
    if not loaded.rows:
        raise ReportError(f"no cell records under {', '.join(map(str, dirs))} "
                          "(expected <dir>/cells/<cell-id>/run.json from `megatron benchmark`)")
    return loaded


def _merge(by_id: dict[str, dict], row: dict, warnings: list[str]) -> None:
    """Keep one row per cell id: a complete copy over an unfinished one; disagreeing copies are reported."""
    prev = by_id.get(row["cell_id"])
    if prev is None:
        by_id[row["cell_id"]] = row
    elif prev["status"] != "complete" and row["status"] == "complete":
        by_id[row["cell_id"]] = row
    elif prev["status"] == "complete" and row["status"] == "complete" and any(prev[k] != row[k] for k in METRICS):
        warnings.append(f"cell {row['cell_id']} appears in {prev['_dir']} and {row['_dir']} with different results; "
                        "kept the first (check that both ran the same grid)")


def setting_of(row: dict) -> tuple:
    n = row["n_sources"] if row["n_sources"] is not None else "all"
    lr = f"x{row['lr']:g}" if row.get("lr_scale") and row["lr"] is not None else row["lr"]
    return (n, row["shots"], lr, row["selection"])


def _skey(setting: tuple) -> tuple:
    return tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in setting)


def setting_label(setting: tuple, n_all: int | None = None) -> str:
    n, k, lr, sel = setting
    ns = f"N=all ({n_all})" if n == "all" and n_all else f"N={n}"
    parts = [ns if n == "all" else f"{ns} ({sel})", f"K={k}"]
    if isinstance(lr, str):  # a multiplier of the base rates
        parts.append(f"lr ×{lr[1:]}")
    elif lr is not None:
        parts.append(f"lr={lr:g}")
    return ", ".join(parts)


def complete(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "complete" and r["mAP50"] is not None]


def n_all(loaded: Loaded) -> int | None:
    for b in loaded.benchmark:
        if b.get("all_sources"):
            return len(b["all_sources"])
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def fixed_epoch(rows: list[dict], epoch: int | None) -> int | None:
    """The epoch for "at a fixed epoch" plots: given, else the last epoch every complete cell reached."""
    lens = [r["n_epochs"] for r in complete(rows) if r["n_epochs"]]
    if not lens:
        return None
    return min(epoch, min(lens)) if epoch else min(lens)

