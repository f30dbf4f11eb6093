"""Where benchmark cells run (megatron.benchmark.executors): the submitit path for real through submitit's local
executor — a job folder with pickled jobs and logs, a killed job resubmitted and resumed, the same report as the
local process pool — and the bad input of the SLURM executor (no sbatch, a partition sbatch refuses, an unknown
executor, --no-wait)."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

import _benchmark_fakes as fakes
from megatron.benchmark import executors as ex
from megatron.benchmark import grid as bm
from megatron.cli import main
from megatron.errors import ConfigError

TESTS = Path(__file__).resolve().parent
# every cell a submitit job: a fresh Python process importing torch, 5-15 s each on a shared 2-core machine
SLOW = pytest.mark.slow
FAST = ex.SlurmOptions(poll_s=0.2, time=5)
# two learners x two seeds: four cells
GRID = {"learners": ["reptile"], "seeds": [0, 1], "n_sources": ["all"], "budget": 600, "controls": False}


@pytest.fixture
def job_env(monkeypatch):
    """submitit's jobs are fresh Python processes: they find the fake runners through PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def make(grid: dict | None = None):
    base = {"data": {"sources": fakes.SOURCES}, "training": {"meta_epochs": 3}}
    return bm.load_benchmark_config(None, grid or GRID, base_overrides=None)[0], base


def rows(out: Path) -> list[dict]:
    data = json.loads((out / "results.json").read_text())
    return sorted(({k: v for k, v in r.items() if k not in ("wall_s", "run_dir")} for r in data),
                  key=lambda r: r["cell_id"])


# in the default suite: the contract (real submitit jobs, a killed one resubmitted), ~25 s each
def test_submitit_local_runs_every_cell_as_a_job_and_reports_as_the_local_executor_does(tmp_path, job_env):
    bcfg, base = make()
    local = bm.run_benchmark(bcfg, base, tmp_path / "local", runner=fakes.fake_runner, progress=False)
    jobs = bm.run_benchmark(bcfg, base, tmp_path / "jobs", runner=fakes.fake_runner, progress=False,
                            executor="submitit-local", slurm=FAST)
    assert not jobs.failed and sorted(jobs.ran) == sorted(local.ran) and len(jobs.ran) == 4
    assert jobs.executor == "submitit-local"
    folder = tmp_path / "jobs" / "submitit"
    ids = json.loads((folder / "jobs.json").read_text())["jobs"]
    assert sorted(ids) == sorted(jobs.ran)
    for job_id in ids.values():
        # submitit's own files: the pickled call, its pickled result and the job's logs
        assert (folder / job_id / f"{job_id}_submitted.pkl").exists()
        assert (folder / job_id / f"{job_id}_0_result.pkl").exists()
        assert (folder / job_id / f"{job_id}_0_log.out").exists()
    assert rows(tmp_path / "jobs") == rows(tmp_path / "local")
    assert (tmp_path / "jobs" / "report.md").exists()


# in the default suite: the contract (real submitit jobs, a killed one resubmitted), ~25 s each
def test_a_killed_job_is_resubmitted_and_its_cell_resumes(tmp_path, job_env, monkeypatch):
    bcfg, base = make()
    victim = "reptile__nall__k20__all__s1"
    monkeypatch.setenv(fakes.DIE_AT_ENV, victim)
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.dying_runner, progress=False,
                           executor="submitit-local", slurm=FAST)
    assert not res.failed and len(res.ran) == 4
    cell = tmp_path / "cells" / victim
    assert (cell / "died-once").exists() and (cell / "resumed").exists()  # the second job resumed the cell
    assert json.loads((cell / "run.json").read_text())["status"] == "complete"
    jobs = json.loads((tmp_path / "submitit" / "jobs.json").read_text())
    assert jobs["resubmits"] == {victim: 1}
    monkeypatch.delenv(fakes.DIE_AT_ENV)
    clean = bm.run_benchmark(bcfg, base, tmp_path / "clean", runner=fakes.fake_runner, progress=False)
    assert rows(tmp_path) == rows(tmp_path / "clean")


@SLOW
def test_a_job_killed_more_often_than_allowed_is_a_failed_cell_that_a_rerun_resumes(tmp_path, job_env, monkeypatch):
    bcfg, base = make({**GRID, "seeds": [0]})
    victim = "reptile__nall__k20__all__s0"
    monkeypatch.setenv(fakes.DIE_AT_ENV, victim)
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.dying_runner, progress=False, report=False,
                           executor="submitit-local", slurm=ex.SlurmOptions(poll_s=0.2, max_resubmits=0))
    assert list(res.failed) == [victim] and "without a result" in res.failed[victim]
    assert "without a result" in (tmp_path / "cells" / victim / "error.txt").read_text()
    again = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.dying_runner, progress=False, report=False,
                             executor="submitit-local", slurm=FAST)
    assert again.ran == [victim] and (tmp_path / "cells" / victim / "resumed").exists()
    assert not (tmp_path / "cells" / victim / "error.txt").exists()


@SLOW
def test_a_cell_that_raises_is_failed_once_not_resubmitted(tmp_path, job_env):
    bcfg, base = make()
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.failing_runner, progress=False, report=False,
                           executor="submitit-local", slurm=FAST)
    assert list(res.failed) == ["reptile__nall__k20__all__s1"] and "loss became nan" in res.failed["reptile__nall__k20__all__s1"]
    assert json.loads((tmp_path / "submitit" / "jobs.json").read_text())["resubmits"] == {}


@SLOW
def test_no_wait_submits_and_leaves_the_report_to_megatron_report(tmp_path, job_env):
    bcfg, base = make()
    res = bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, progress=False,
                           executor="submitit-local", slurm=FAST, wait=False)
    assert sorted(res.submitted) == sorted(c.id for c in res.plan.cells) and res.report is None
    assert json.loads((tmp_path / "submitit" / "jobs.json").read_text())["jobs"].keys() == set(res.submitted)
    # the jobs go on without this process; wait for their records as a user would (squeue, then the report)
    deadline = time.monotonic() + 300
    while not all(bm.cell_state(tmp_path / "cells" / c) == "complete" for c in res.submitted):
        assert time.monotonic() < deadline, "the submitted jobs did not finish"
        time.sleep(0.5)
    assert main(["report", str(tmp_path)]) == 0
    assert len(rows(tmp_path)) == len(res.submitted)


def test_slurm_without_sbatch_says_so_and_suggests_the_alternatives(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    bcfg, base = make()
    with pytest.raises(ConfigError, match="no `sbatch` on this machine") as err:
        bm.run_benchmark(bcfg, base, tmp_path / "out", runner=fakes.fake_runner, executor="slurm")
    assert "submitit-local" in str(err.value) and "--shard" in str(err.value)
    assert not list((tmp_path / "out").glob("*.json")) and not (tmp_path / "out" / "cells").exists()  # nothing run
    grid = tmp_path / "grid.yaml"
    grid.write_text("base:\n  data:\n    sources: [a, b]\ngrid:\n  learners: [reptile]\n  budget: 100\n")
    # a --slurm-* option alone means SLURM
    assert main(["benchmark", "-c", str(grid), "--out", str(tmp_path / "o"), "--slurm-partition", "gpu"]) == 2
    assert "no `sbatch` on this machine" in " ".join("".join(capsys.readouterr()).split())
    assert main(["benchmark", "-c", str(grid), "--out", str(tmp_path / "o"), "--executor", "local",
                 "--slurm-gpus-per-cell", "2"]) == 2
    assert "--slurm-gpus-per-cell given, but the cells run with --executor local" in " ".join("".join(capsys.readouterr()).split())


def _fake_slurm(bin_dir: Path, sbatch_body: str) -> None:
    bin_dir.mkdir()
    for name, body in (("sbatch", sbatch_body), ("srun", "exit 0")):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_a_partition_sbatch_refuses_is_reported_with_sbatch_s_whole_message(tmp_path, monkeypatch):
    message = "sbatch: error: invalid partition specified: nosuch\nsbatch: error: Batch job submission failed: Invalid partition name specified"
    _fake_slurm(tmp_path / "bin", f"echo '{message}' >&2\nexit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    bcfg, base = make()
    with pytest.raises(ConfigError) as err:
        bm.run_benchmark(bcfg, base, tmp_path / "out", runner=fakes.fake_runner, executor="slurm",
                         slurm=ex.SlurmOptions(partition="nosuch"), report=False)
    assert message in str(err.value) and "partition 'nosuch'" in str(err.value)
    sbatch_files = list((tmp_path / "out" / "submitit").rglob("*.sh"))
    assert sbatch_files and "#SBATCH --partition=nosuch" in sbatch_files[0].read_text()


def test_an_unknown_executor_lists_the_executors(tmp_path):
    bcfg, base = make()
    with pytest.raises(ConfigError, match="unknown executor 'kubernetes'; the executors are: local, submitit-local, slurm"):
        bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, executor="kubernetes")
    with pytest.raises(SystemExit):
        main(["benchmark", "--executor", "kubernetes"])
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  learners: [reptile]\nexecutor:\n  name: kubernetes\n")
    with pytest.raises(ConfigError, match="executor.name") as err:
        bm.load_benchmark_config(grid)
    assert all(name in str(err.value) for name in ex.EXECUTOR_NAMES)


def test_the_benchmark_file_s_executor_section_sets_the_slurm_options(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("base:\n  data:\n    sources: [a, b]\ngrid:\n  learners: [reptile]\n  budget: 100\n"
                    "executor:\n  name: slurm\n  slurm: {partition: gpu, gpus_per_cell: 2, time: '1:30:00', "
                    "array_parallelism: 4}\n")
    bcfg, _ = bm.load_benchmark_config(grid)
    assert bcfg.executor.name == "slurm"
    assert bcfg.executor.slurm.time == 90 and bcfg.executor.slurm.gpus_per_cell == 2
    assert ex.parse_slurm_time("2-00:00:00") == 2880 and ex.parse_slurm_time("45") == 45


def test_the_local_executor_refuses_no_wait(tmp_path):
    bcfg, base = make()
    with pytest.raises(ConfigError, match="--no-wait"):
        bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, wait=False)


def test_a_cell_whose_earlier_job_still_runs_is_not_submitted_twice(tmp_path):
    bcfg, base = make()
    folder = tmp_path / "submitit"
    folder.mkdir(parents=True)
    # an earlier --no-wait submission whose job (a live process: this one) still runs the cell
    (folder / "jobs.json").write_text(json.dumps({"executor": "submitit-local", "resubmits": {},
                                                  "jobs": {"reptile__nall__k20__all__s0": str(os.getpid())}}))
    with pytest.raises(ConfigError, match=r"still queued or running.*reptile__nall__k20__all__s0 \(job \d+\)"):
        bm.run_benchmark(bcfg, base, tmp_path, runner=fakes.fake_runner, progress=False,
                         executor="submitit-local", slurm=FAST)
    assert not (tmp_path / "cells" / "reptile__nall__k20__all__s0" / "run.json").exists()
