"""The default run's expected numbers, from committed records (issue 25, item 2).

``make run`` (``megatron run --learner reptile --detector yolox``) is what a new user runs first, and the README
says what it gives. One run is one draw, and floating-point results differ between CPUs, so the README states the
mean and spread of five seeds of it — each a complete run record committed under
``benchmarks/results/default_run/runs/seed<S>/run.json`` — and says that a single run lands anywhere in it.
Nothing here is typed by hand: :func:`readme_block` writes the README's paragraph and :func:`folder_readme` the
folder's README from the records, and ``tests/test_committed_results.py`` rebuilds both and compares.

Making the folder (the commands are also in the generated README)::

    for s in 0 1 2 3 4; do
        megatron run --learner reptile --detector yolox --set seed=$s --set training.num_threads=1 --out runs/default_run --name seed$s
    done
    python -m megatron.benchmark.default_run runs/default_run --out benchmarks/results/default_run --readme README.md

The second command copies each seed's ``run.json`` (no checkpoints, no models) and writes both texts. While the
folder holds no records, the README's paragraph says so and quotes the committed five-seed spread of
``benchmarks/results/seed_spread/`` (each learner run alone) instead — also read from its files.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from megatron.atomic_io import atomic_write_text
from megatron.benchmark.rows import POINTS, ReportError
from megatron.training.run_files import RECORD_FILE

RUNS_DIR = "runs"
README_FILE = "README.md"
#: the markers around the generated paragraph in the repository README
BLOCK_START = "<!-- default-run: written by `python -m megatron.benchmark.default_run` from committed records -->"
BLOCK_END = "<!-- /default-run -->"
# one torch thread per run, so two seeds can run side by side on the 2-core machine
RUN_COMMAND = ("megatron run --learner reptile --detector yolox --set seed={seed} --set training.num_threads=1 "
               "--out runs/default_run --name seed{seed}")
SEEDS = (0, 1, 2, 3, 4)
#: the committed per-seed spread used while default_run/ holds no records (learner -> file)
SEED_SPREAD_FILES = {"finetune": "finetune.json", "reptile": "reptile.json"}


@dataclass(frozen=True)
class Spread:
    """One learner's held-out mAP50 over seeds, in points."""

    learner: str
    seeds: tuple[int, ...]
    final: tuple[float, ...]
    selected: tuple[float | None, ...]  # the model chosen on validation; None without a validation split

    @staticmethod
    def _stats(values) -> tuple[float, float | None, float, float]:
        vs = [v for v in values if v is not None]
        return (statistics.mean(vs), statistics.stdev(vs) if len(vs) > 1 else None, min(vs), max(vs))

    def final_stats(self):
        return self._stats(self.final)

    def selected_stats(self):
        return self._stats(self.selected) if any(v is not None for v in self.selected) else None


def _words(stats: tuple) -> str:
    mean, sd, low, high = stats
    return f"{mean:.1f} (sd {sd:.1f}; {low:.1f}–{high:.1f})" if sd is not None else f"{mean:.1f}"


def load_records(folder: Path) -> list[dict]:
    """Every seed's complete run record under ``folder/runs/seed*/run.json``, in seed order; an unfinished run is
    an error naming its file."""
    records = []
    for path in sorted((Path(folder) / RUNS_DIR).glob(f"seed*/{RECORD_FILE}")):
        rec = json.loads(path.read_text())
        if rec.get("status") != "complete":
            raise ReportError(f"{path}: the run is not complete (status {rec.get('status')!r}); re-run that seed")
        records.append(rec)
    return sorted(records, key=lambda r: r["seed"])


def load_spreads(folder: Path) -> tuple[list[Spread], list[dict]]:
    """Per learner the final and validation-chosen held-out mAP50 of every seed's record under ``folder/runs``,
    and the records themselves (for versions and machine)."""
    records = load_records(folder)
    learners: dict[str, list[tuple[int, float, float | None]]] = {}
    for rec in records:
        for name, lrec in rec["learners"].items():
            best = (lrec.get("best") or {}).get("mAP50")
            learners.setdefault(name, []).append((rec["seed"], POINTS * lrec["final"]["mAP50"],
                                                  None if best is None else POINTS * best))
    spreads = [Spread(name, *map(tuple, zip(*vals))) for name, vals in learners.items()]
    return spreads, records


def load_seed_spread(folder: Path) -> list[Spread]:
    """The committed ``seed_spread`` files (``bench_seed_spread.py``'s output) as spreads."""
    out = []
    for learner, name in SEED_SPREAD_FILES.items():
        path = Path(folder) / name
        if path.exists():
            data = json.loads(path.read_text())
            rows = data["rows"]
            out.append(Spread(learner, tuple(r["seed"] for r in rows), tuple(r["final_mAP50"] for r in rows),
                              tuple(r["best_mAP50"] for r in rows)))
    return out


def _paired_words(spreads: list[Spread]) -> str:
    """The first learner minus the baseline (the last), seed by seed, final model; empty for one learner."""
    if len(spreads) < 2 or spreads[0].seeds != spreads[-1].seeds:
        return ""
    meta, base = spreads[0], spreads[-1]
    diffs = [a - b for a, b in zip(meta.final, base.final)]
    above = sum(d > 0 for d in diffs)
    return (f" Paired by seed, `{meta.learner}` − `{base.learner}` (final model) was "
            f"{', '.join(f'{d:+.1f}' for d in diffs)} points (mean {statistics.mean(diffs):+.1f}; "
            f"`{meta.learner}` above in {above} of {len(diffs)} seeds).")


def readme_block(default_run: Path, seed_spread: Path, root: Path | None = None) -> str:
    """The README's paragraph on what ``make run`` gives, with its markers; folders named relative to ``root``
    (default: the current directory)."""
    root = Path(root) if root is not None else Path.cwd()

    def name(path: Path) -> str:
        path = Path(path)
        return (path.resolve().relative_to(root.resolve()) if path.resolve().is_relative_to(root.resolve())
                else path).as_posix()

    spreads, records = load_spreads(default_run) if (Path(default_run) / RUNS_DIR).is_dir() else ([], [])
    if spreads:
        v = records[0].get("versions") or {}
        parts = [f"`{s.learner}` {_words(s.final_stats())}"
                 + (f", chosen on validation {_words(s.selected_stats())}" if s.selected_stats() else "")
                 for s in spreads]
        body = (f"**What `make run` gives.** Over {len(records)} seeds of it "
                f"(`{name(default_run)}/`, {v.get('cpu', '?')}, {v.get('threads', '?')} torch thread(s)), the "
                f"held-out mAP50 of the final model was: {'; '.join(parts)}. A single run lands anywhere in that "
                "spread: one seed is one draw, and floating-point results differ between CPUs, so do not expect "
                "these numbers to the decimal." + _paired_words(spreads))
    else:
        old = load_seed_spread(seed_spread)
        quoted = "; ".join(f"`{s.learner}` {_words(s.final_stats())}" for s in old)
        body = (f"**What `make run` gives.** No five-seed records of `make run` are committed yet "
                f"(`{name(default_run)}/`, made by `python -m megatron.benchmark.default_run`). The nearest "
                f"committed measurement is `{name(seed_spread)}/` (each learner run alone, five seeds, one torch "
                f"thread): final held-out mAP50 {quoted}. A single run lands anywhere in such a spread: one seed is "
                "one draw, and floating-point results differ between CPUs.")
    return f"{BLOCK_START}\n{textwrap.fill(body, 115, break_on_hyphens=False)}\n{BLOCK_END}"


def folder_readme(default_run: Path) -> str:
    """The folder's README: the commands, the machine, every seed's numbers and their mean and spread."""
    spreads, records = load_spreads(default_run)
    if not spreads:
        raise ReportError(f"{default_run}: no run records under {RUNS_DIR}/seed*/{RECORD_FILE}")
    v = records[0].get("versions") or {}
    lines = ["# The default run (`make run`), five seeds", "",
             "Written by `python -m megatron.benchmark.default_run` from the records in `runs/seed*/run.json`; do "
             "not edit. The repository README's paragraph on what `make run` gives comes from the same records.", "",
             "Commands:", "", "    for s in " + " ".join(str(s) for s in SEEDS) + "; do",
             "        " + RUN_COMMAND.format(seed="$s"), "    done",
             "    python -m megatron.benchmark.default_run runs/default_run --out benchmarks/results/default_run "
             "--readme README.md", "",
             f"Machine: {v.get('platform', '?')}; cpu: {v.get('cpu', '?')}; device: {v.get('device', '?')}; "
             f"threads: {v.get('threads', '?')}; megatron {records[0].get('megatron_version', '?')}, torch "
             f"{v.get('torch', '?')}, mmdet {v.get('mmdet', '?')}.", "",
             "| learner | held-out mAP50, final model, per seed | mean (sd; range) | chosen on validation, per seed | "
             "mean (sd; range) |", "|---|---|---|---|---|"]
    for s in spreads:
        per = ", ".join(f"{x:.1f}" for x in s.final)
        sel = ", ".join("–" if x is None else f"{x:.1f}" for x in s.selected)
        chosen = s.selected_stats()
        lines.append(f"| {s.learner} | {per} | {_words(s.final_stats())} | {sel} | "
                     f"{_words(chosen) if chosen else '–'} |")
    walls = [r["wall_s"] for r in records if r.get("wall_s") is not None]
    if walls:
        lines += ["", f"Wall time per run: {min(walls):,.0f} – {max(walls):,.0f} s."]
    return "\n".join(lines) + "\n"


def replace_block(readme_text: str, block: str, markers: tuple[str, str] = (BLOCK_START, BLOCK_END)) -> str:
    """``readme_text`` with its generated paragraph (between the two ``markers``) replaced by ``block``."""
    first, last = markers
    start, end = readme_text.find(first), readme_text.find(last)
    if start < 0 or end < start:
        raise ReportError(f"the README has no generated paragraph (markers {first!r} … {last!r}); put the two "
                          "markers where it goes")
    return readme_text[:start] + block + readme_text[end + len(last):]


def collect(runs: Path, out: Path) -> int:
    """Copy each ``runs/seed<S>/run.json`` into ``out/runs/seed<S>/`` (records only); returns how many."""
    n = 0
    for path in sorted(Path(runs).glob(f"seed*/{RECORD_FILE}")):
        dst = Path(out) / RUNS_DIR / path.parent.name / RECORD_FILE
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="?", help="a folder of seed<S>/ run directories to copy the records from")
    ap.add_argument("--out", default="benchmarks/results/default_run", help="the committed folder")
    ap.add_argument("--seed-spread", default="benchmarks/results/seed_spread")
    ap.add_argument("--readme", help="the README whose generated paragraph to rewrite")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.runs:
        print(f"{collect(Path(args.runs), out)} record(s) copied into {out / RUNS_DIR}")
    if (out / RUNS_DIR).is_dir():
        atomic_write_text(out / README_FILE, folder_readme(out))
    if args.readme:
        path = Path(args.readme)
        atomic_write_text(path, replace_block(path.read_text(), readme_block(out, Path(args.seed_spread))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
