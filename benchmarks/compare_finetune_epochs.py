"""Does the default run's verdict survive a baseline that is fine-tuned for longer? F = 10 against F = 20.

`make run` fine-tunes every start (the meta-learned one and the transfer-learning baseline) for
``training.finetune_epochs`` epochs of the K = 20 pool at every meta-epoch: 10 until this measurement (30 steps),
20 since. ``benchmarks/results/finetune_noise/`` had found that fine-tuning the stage-1 checkpoint alone for 20
epochs lifts held-out mAP50 from 53.0 to 89.6 and shrinks the spread over streams from sd 8.7 to 3.1: at F = 10
the target head is still being learned when the schedule ends. A meta-learner that wins only because its start
adapts faster within 30 steps wins a race whose length we chose. This compares whole default runs at the two
lengths, paired by seed: the default run's committed records (``benchmarks/results/default_run/``) and the same
runs at the other length (``benchmarks/results/finetune_epochs/runs/``); same code, stage-1 checkpoint, splits
and streams, only the fine-tuning length differs (both arms, every meta-epoch).

    for s in 0 1 2 3 4; do
        megatron run --learner reptile --detector yolox --set seed=$s --set training.num_threads=1 \\
            --set training.finetune_epochs=10 --out runs/finetune_epochs --name seed$s
    done
    python benchmarks/compare_finetune_epochs.py runs/finetune_epochs

The second command copies each seed's ``run.json`` into ``benchmarks/results/finetune_epochs/runs/`` and rewrites
the generated part of that folder's README (between the markers); ``tests/test_compare_finetune_epochs.py``
rebuilds it from the records and compares. Every pairing assumption is checked, not assumed: the two sets must
share their seeds and stage-1 checkpoint, and their configs may differ only in the fine-tuning epochs (and where
they wrote).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron.atomic_io import atomic_write_text  # noqa: E402
from megatron.benchmark import default_run, stats  # noqa: E402
from megatron.benchmark.default_run import RUNS_DIR, collect  # noqa: E402
from megatron.benchmark.rows import POINTS, ReportError  # noqa: E402
from megatron.training.run_files import RECORD_FILE  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "results" / "default_run"
FOLDER = ROOT / "benchmarks" / "results" / "finetune_epochs"
BLOCK_START = "<!-- finetune-epochs: written by `python benchmarks/compare_finetune_epochs.py` from the records -->"
BLOCK_END = "<!-- /finetune-epochs -->"
#: the report's default equivalence margin, in mAP50 points (``report.equivalence_margin``)
MARGIN = 5.0
#: config keys that may differ between the two sets: where each run wrote, and the factor under test
FREE_KEYS = {("output", "dir"), ("output", "name"), ("training", "finetune_epochs"), ("seed",)}
VIEWS = (("final", "final model"), ("best", "chosen on validation"))


def load_records(folder: Path) -> dict[int, dict]:
    """seed -> complete run record, from ``folder/runs/seed*/run.json``."""
    out = {rec["seed"]: rec for rec in default_run.load_records(folder)}
    if not out:
        raise ReportError(f"{folder}: no run records under {RUNS_DIR}/seed*/{RECORD_FILE}")
    return out


def _flat(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def pairing_problems(short: dict[int, dict], long: dict[int, dict]) -> list[str]:
    """Why the two sets of runs are not pairs differing only in the fine-tuning epochs (empty: they are)."""
    problems = []
    if set(short) != set(long):
        problems.append(f"the seeds differ: {sorted(short)} against {sorted(long)}")
    for seed in sorted(set(short) & set(long)):
        a, b = short[seed], long[seed]
        if a["pretrain"].get("sha256") != b["pretrain"].get("sha256"):
            problems.append(f"seed {seed}: different stage-1 checkpoints")
        fa, fb = _flat(a["config"]), _flat(b["config"])
        differ = sorted(".".join(k) for k in set(fa) | set(fb) if k not in FREE_KEYS and fa.get(k) != fb.get(k))
        if differ:
            problems.append(f"seed {seed}: the configs differ in {', '.join(differ)}")
        if a.get("megatron_version") != b.get("megatron_version"):
            problems.append(f"seed {seed}: megatron {a.get('megatron_version')} against {b.get('megatron_version')}")
    return problems


def _values(records: dict[int, dict], learner: str, view: str) -> dict[int, float]:
    return {s: POINTS * r["learners"][learner][view]["mAP50"] for s, r in records.items()
            if (r["learners"][learner].get(view) or {}).get("mAP50") is not None}


def _epochs(records: dict[int, dict]) -> int:
    return records[min(records)]["config"]["training"]["finetune_epochs"]


def compare(short: dict[int, dict], long: dict[int, dict], margin: float = MARGIN) -> list[dict]:
    """The table's rows: each learner's level at both lengths with the paired change, and the paired
    meta-learner - baseline difference at both lengths with its change (the interaction). Every verdict is
    Holm-corrected over all the paired comparisons of the table (both tests, as the report does)."""
    problems = pairing_problems(short, long)
    if problems:
        raise ReportError("the two sets of runs are not pairs: " + "; ".join(problems) + ". Make both with the same "
                          "code, seeds and stage-1 cache, only --set training.finetune_epochs differing")
    learners = list(short[min(short)]["learners"])  # the meta-learner first, the baseline last
    meta, base = learners[0], learners[-1]
    rows, diffs = [], []
    for view, view_words in VIEWS:
        for learner in learners:
            a, b = _values(short, learner, view), _values(long, learner, view)
            change = stats.paired_difference(b, a).interval
            rows.append({"what": f"`{learner}`, {view_words}", "short": stats.mean_ci(a.values()),
                         "long": stats.mean_ci(b.values()), "change": change})
            diffs.append(change)
        row = {"what": f"`{meta}` − `{base}` (paired), {view_words}"}
        gaps = {}
        for key, records in (("short", short), ("long", long)):
            pair = stats.paired_difference(_values(records, meta, view), _values(records, base, view))
            row[key] = pair.interval
            gaps[key] = dict(zip(pair.seeds, pair.differences))
        # the interaction: does the meta-learner's lead over the baseline change with the fine-tuning length?
        row["change"] = stats.paired_difference(gaps["long"], gaps["short"]).interval
        diffs += [row["short"], row["long"], row["change"]]
        rows.append(row)
    p_diff = stats.holm([stats.t_test_p(d) for d in diffs])
    p_equiv = stats.holm([stats.tost(d, margin).p_value if d.available else None for d in diffs])
    words = {id(d): stats.equivalence_verdict(d, margin, p, q) for d, p, q in zip(diffs, p_diff, p_equiv)}
    for row in rows:
        row["verdicts"] = {k: words[id(row[k])] for k in ("short", "long", "change") if id(row.get(k)) in words}
    return rows


def _cell(iv: stats.Interval, signed: bool) -> str:
    sign = "+" if signed else ""
    if not iv.available:
        return f"{iv.mean:{sign}.1f} (n={iv.n})"
    return f"{iv.mean:{sign}.1f} [{iv.low:{sign}.1f}, {iv.high:{sign}.1f}]"


def _held_out(*sets: dict[int, dict]) -> str:
    sizes = sorted({r.get("eval_images") for records in sets for r in records.values()}, key=str)
    return " or ".join(str(n) for n in sizes)


def _default_mark(epochs: int) -> str:
    from megatron.config import TrainingConfig

    return " (the default)" if TrainingConfig().finetune_epochs == epochs else ""


def ordered(a: dict[int, dict], b: dict[int, dict]) -> tuple[dict[int, dict], dict[int, dict]]:
    """The two sets, shorter fine-tuning first (whichever of them is the default run's)."""
    if _epochs(a) == _epochs(b):
        raise ReportError(f"both sets of runs fine-tune for {_epochs(a)} epochs: nothing to compare")
    return (a, b) if _epochs(a) < _epochs(b) else (b, a)


def readme_block(short: dict[int, dict], long: dict[int, dict], margin: float = MARGIN) -> str:
    """The generated part of the folder's README, with its markers."""
    rows = compare(short, long, margin)
    f_short, f_long = _epochs(short), _epochs(long)
    seeds = ", ".join(str(s) for s in sorted(short))
    lines = [BLOCK_START,
             f"Seeds {seeds}; held-out mAP50 ({_held_out(short, long)} images), mean [95 % interval]; a difference's "
             "verdict is Holm-corrected "
             f"over the {sum(len(r['verdicts']) for r in rows)} paired comparisons of the table, equivalence margin "
             f"±{margin:g} points.", "",
             f"| | F = {f_short}{_default_mark(f_short)} | F = {f_long}{_default_mark(f_long)} | "
             f"F = {f_long} − F = {f_short} (paired) |",
             "|---|---|---|---|"]
    for row in rows:
        v = row["verdicts"]
        cells = [_cell(row[key], signed=key in v) + (f", {v[key]}" if key in v else "")
                 for key in ("short", "long", "change")]
        lines.append(f"| {row['what']} | {' | '.join(cells)} |")
    def series(values: dict[int, float]) -> str:
        sd = f"{statistics.stdev(values.values()):.1f}" if len(values) > 1 else "–"
        return f"{', '.join(f'{values[s]:.1f}' for s in sorted(values))} | {sd}"

    lines += ["", "Per seed (held-out mAP50, seeds in order), with the image passes each arm was charged and the time "
              "its meta-epochs took (source training, fine-tuning and evaluation, from the records):", "",
              "| run | final model | sd | chosen on validation | sd | image passes | meta-epochs' time per run |",
              "|---|---|---|---|---|---|---|"]
    for name, records in ((f"F = {f_short}", short), (f"F = {f_long}", long)):
        for learner in records[min(records)]["learners"]:
            passes = sorted({r["learners"][learner]["compute"]["spent"] for r in records.values()})
            secs = [sum(e["wall_s"] for e in r["learners"][learner]["epochs"]) for r in records.values()]
            lines.append(f"| {learner}, {name} | {series(_values(records, learner, 'final'))} | "
                         f"{series(_values(records, learner, 'best'))} | {', '.join(f'{p:,}' for p in passes)} | "
                         f"{min(secs):,.0f}–{max(secs):,.0f} s |")
    return "\n".join(lines + [BLOCK_END])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="?", help="a folder of seed<S>/ run directories (the other length) to copy the "
                    "records from")
    ap.add_argument("--reference", default=str(REFERENCE), help="the default run's committed folder")
    ap.add_argument("--out", default=str(FOLDER))
    ap.add_argument("--margin", type=float, default=MARGIN)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.runs:
        print(f"{collect(Path(args.runs), out)} record(s) copied into {out / RUNS_DIR}")
    block = readme_block(*ordered(load_records(Path(args.reference)), load_records(out)), args.margin)
    readme = out / "README.md"
    new = f"# Fine-tuning epochs in the default run\n\n{BLOCK_START}\n{BLOCK_END}\n"
    text = readme.read_text() if readme.exists() else new
    atomic_write_text(readme, default_run.replace_block(text, block, (BLOCK_START, BLOCK_END)))
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
