"""Every committed benchmark result rebuilds from the repository alone: `megatron report benchmarks/results/<name>`
on a copy of its cell records gives the committed results and verdicts (benchmarks/results/README.md)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import _benchmark_fakes as fakes
from megatron.benchmark import grid as bm
from megatron.cli import main

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
NOT_REBUILT = {"archive", "gpu"}  # superseded results; results at the method's scale, made elsewhere
RECORD_FILES = {"cell.json", "run.json", "error.txt"}


def result_folders() -> list[Path]:
    if not RESULTS.is_dir():
        return []
    return sorted(p for p in RESULTS.iterdir() if p.is_dir() and p.name not in NOT_REBUILT and (p / "cells").is_dir())


def verdict_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("- **") and " vs finetune, " in line]


def rebuild_problems(folder: Path, work: Path) -> list[str]:
    """Why ``folder`` does not rebuild to what it holds (empty: it does). Works on a copy in ``work``."""
    problems = []
    for name in ("report.md", "results.json", "benchmark.json"):
        if not (folder / name).exists():
            problems.append(f"{folder.name}: no {name}")
    extra = sorted(str(p.relative_to(folder)) for p in (folder / "cells").rglob("*")
                   if p.is_file() and p.name not in RECORD_FILES)
    if extra:
        problems.append(f"{folder.name}: cell folders hold more than their records: {extra[:3]}")
    if problems:
        return problems
    copy = work / folder.name
    shutil.copytree(folder / "cells", copy / "cells")
    shutil.copyfile(folder / "benchmark.json", copy / "benchmark.json")
    try:
        rc = main(["report", str(copy)])
    except Exception as exc:  # a broken record: say which folder
        return [f"{folder.name}: megatron report failed: {type(exc).__name__}: {exc}"]
    if rc != 0:
        return [f"{folder.name}: megatron report exited {rc}"]
    committed = {r["cell_id"]: r for r in json.loads((folder / "results.json").read_text())}
    rebuilt = {r["cell_id"]: r for r in json.loads((copy / "results.json").read_text())}
    if set(committed) != set(rebuilt):
        problems.append(f"{folder.name}: cells differ: committed only {sorted(set(committed) - set(rebuilt))[:3]}, "
                        f"records only {sorted(set(rebuilt) - set(committed))[:3]}")
    for cid in sorted(set(committed) & set(rebuilt)):
        # a key the report has since learnt to write may be new; every committed value must come back as it was
        wrong = sorted(k for k, v in committed[cid].items() if rebuilt[cid].get(k, object()) != v)
        if wrong:
            problems.append(f"{folder.name}: cell {cid}: {', '.join(wrong)} differ from its record")
    text = (folder / "report.md").read_text()
    again = (copy / "report.md").read_text().replace(str(copy), f"benchmarks/results/{folder.name}")
    if verdict_lines(text) != verdict_lines(again):
        problems.append(f"{folder.name}: report.md's verdicts differ from the ones its records give "
                        f"(re-run `megatron report benchmarks/results/{folder.name}`)")
    for ref in re.findall(r"!\[[^]]*\]\(([^)]+)\)", text):
        if not (folder / ref).exists():
            problems.append(f"{folder.name}: report.md shows {ref}, which is not committed")
    return problems


@pytest.mark.parametrize("folder", result_folders(), ids=lambda p: p.name)
def test_committed_result_rebuilds_from_its_records(folder, tmp_path):
    assert rebuild_problems(folder, tmp_path) == []


def test_the_old_result_is_archived_with_its_reason():
    assert not (RESULTS / "cpu_yolox_tiny").exists()
    readme = (RESULTS / "archive" / "cpu_yolox_tiny" / "README.md").read_text()
    assert "Superseded" in readme and "controls" in readme
    assert "cpu_yolox_tiny" in (RESULTS / "archive" / "README.md").read_text()


# --- the check itself, on a result made with the fake runner ----------------------------------------------
@pytest.fixture
def made(tmp_path) -> Path:
    bcfg, _ = bm.load_benchmark_config(None, {"budget": 600, "learners": ["reptile"], "seeds": [0, 1, 2]})
    base = {"data": {"sources": fakes.SOURCES}, "training": {"meta_epochs": 3}}
    bm.run_benchmark(bcfg, base, tmp_path / "run", runner=fakes.fake_runner, progress=False, report=False)
    out = tmp_path / "results" / "demo"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    return out


def test_a_result_made_by_report_out_rebuilds(made, tmp_path):
    assert (made / "cells" / "reptile__nall__k20__all__s0" / "run.json").exists()
    assert rebuild_problems(made, tmp_path / "work") == []


def test_the_check_catches_a_result_that_does_not_match_its_records(made, tmp_path):
    rows = json.loads((made / "results.json").read_text())
    rows[0]["mAP50"] += 0.1
    (made / "results.json").write_text(json.dumps(rows))
    assert any("mAP50 differ" in p for p in rebuild_problems(made, tmp_path / "w1"))


def test_the_check_catches_edited_verdicts_missing_records_and_checkpoints(made, tmp_path):
    report = made / "report.md"
    report.write_text(report.read_text().replace("→ **better**", "→ **worse**"))
    assert any("verdicts differ" in p for p in rebuild_problems(made, tmp_path / "w1"))
    (made / "cells" / "reptile__nall__k20__all__s1" / "run.json").unlink()
    assert any("s1: " in p or "differ" in p for p in rebuild_problems(made, tmp_path / "w2"))
    (made / "cells" / "reptile__nall__k20__all__s0" / "checkpoints").mkdir()
    (made / "cells" / "reptile__nall__k20__all__s0" / "checkpoints" / "last.pt").write_bytes(b"w")
    assert any("more than their records" in p for p in rebuild_problems(made, tmp_path / "w3"))
