"""The set-up script, the Makefile and the CI entry point: their decisions, checked without
installing anything (fake interpreters and a fake ``make`` stand in for the slow parts)."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup.sh"
CI_SCRIPT = REPO_ROOT / ".ci" / "run"


def write_executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_python(path: Path, version: str) -> Path:
    """An 'interpreter' that reports ``version`` and fails every other command."""
    major_minor = ".".join(version.split(".")[:2])
    return write_executable(
        path,
        "#!/bin/sh\n"
        'case "$2" in\n'
        f'  *"%d.%d.%d"*) echo {version} ;;\n'
        f'  *"%d.%d"*) echo {major_minor} ;;\n'
        "  *) exit 1 ;;\n"
        "esac\n",
    )


def scratch_repo(tmp_path: Path) -> Path:
    """A copy of the files the set-up reads, so nothing touches the real .venv."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SETUP_SCRIPT, repo / "scripts" / "setup.sh")
    shutil.copy2(REPO_ROOT / "pyproject.toml", repo / "pyproject.toml")
    return repo


def run_setup(repo: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "MEGATRON_WHEEL_CACHE": str(tmp_path / "wheel-cache"),
        **env,
    }
    full_env.pop("MEGATRON_FORCE_SETUP", None)
    return subprocess.run(
        ["bash", str(repo / "scripts" / "setup.sh")],
        env=full_env, capture_output=True, text=True, timeout=120,
    )


def test_missing_python_is_a_clear_error(tmp_path):
    result = run_setup(scratch_repo(tmp_path), tmp_path, MEGATRON_PYTHON="python3.11-not-installed")
    assert result.returncode != 0
    assert "python3.11-not-installed' was not found" in result.stderr
    assert "MEGATRON_PYTHON" in result.stderr
    assert not (tmp_path / "repo" / ".venv").exists()


def test_wrong_python_version_is_refused(tmp_path):
    interpreter = fake_python(tmp_path / "bin" / "python3.10", "3.10.14")
    result = run_setup(scratch_repo(tmp_path), tmp_path, MEGATRON_PYTHON=str(interpreter))
    assert result.returncode != 0
    assert "is Python 3.10.14" in result.stderr
    assert not (tmp_path / "repo" / ".venv").exists()


def expected_stamp(repo: Path, python_version: str) -> str:
    digest = hashlib.sha256()
    digest.update((repo / "pyproject.toml").read_bytes())
    digest.update((repo / "scripts" / "setup.sh").read_bytes())
    digest.update(python_version.encode())
    return digest.hexdigest()


@pytest.fixture
def python311() -> str:
    found = shutil.which("python3.11")
    if found is None:
        pytest.skip("python3.11 is not on PATH")
    return found


def venv_python_wrapper(repo: Path, target: str) -> None:
    # exec the real interpreter by its own path so it keeps its venv (a symlink would not)
    write_executable(repo / ".venv" / "bin" / "python", f'#!/bin/sh\nexec "{target}" "$@"\n')


def test_matching_stamp_and_working_imports_skip_everything(tmp_path, python311):
    repo = scratch_repo(tmp_path)
    version = subprocess.check_output(
        [python311, "-c", 'import sys; print("%d.%d.%d" % sys.version_info[:3])'], text=True
    ).strip()
    venv_python_wrapper(repo, sys.executable)  # the test venv imports mmdet and mmcv.ops
    (repo / ".venv" / ".megatron-setup-stamp").write_text(expected_stamp(repo, version) + "\n")

    result = run_setup(repo, tmp_path, MEGATRON_PYTHON=python311)

    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert "installing" not in result.stdout
    assert not (tmp_path / "wheel-cache").exists()  # the slow path would have created it


def test_changed_pyproject_invalidates_the_stamp(tmp_path, python311):
    repo = scratch_repo(tmp_path)
    version = subprocess.check_output(
        [python311, "-c", 'import sys; print("%d.%d.%d" % sys.version_info[:3])'], text=True
    ).strip()
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / ".megatron-setup-stamp").write_text(expected_stamp(repo, version) + "\n")
    with (repo / "pyproject.toml").open("a") as handle:
        handle.write("\n# a new dependency would go here\n")
    # a venv of the wrong Python stops the slow path at its first step, before pip runs
    fake_python(repo / ".venv" / "bin" / "python", "3.10.14")

    result = run_setup(repo, tmp_path, MEGATRON_PYTHON=python311)

    assert result.returncode != 0
    assert "up to date" not in result.stdout
    assert "holds Python 3.10, not 3.11" in result.stderr
    assert "make clean" in result.stderr


def test_find_links_keep_the_machine_s_and_add_shared_wheels_and_cache_once(tmp_path, python311):
    repo = scratch_repo(tmp_path)
    shared_wheels = tmp_path / "shared" / "wheels"  # ../shared/wheels beside the repository
    shared_wheels.mkdir(parents=True)
    # a venv of the wrong Python stops the set-up right after it has composed the find-links
    fake_python(repo / ".venv" / "bin" / "python", "3.10.14")

    result = run_setup(
        repo, tmp_path, MEGATRON_PYTHON=python311,
        PIP_FIND_LINKS=f"/opt/wheels {shared_wheels}",  # as .ci/run passes it
    )

    assert result.returncode != 0
    assert f"pip find-links: /opt/wheels {shared_wheels} {tmp_path / 'wheel-cache'}\n" in result.stdout


def ci_run(tmp_path: Path, make_exit: int, with_shared: bool, **env: str):
    """Run a copy of .ci/run in a scratch clone with a fake ``make`` that records its call."""
    workdir = tmp_path / "work"
    repo = workdir / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(CI_SCRIPT, repo / ".ci" / "run")
    if with_shared:
        (workdir / "shared" / "wheels").mkdir(parents=True)
    record = tmp_path / "make-call.txt"
    bin_dir = tmp_path / "bin"
    write_executable(
        bin_dir / "make",
        "#!/bin/sh\n"
        f'{{ echo "args:$*"; echo "find_links:$PIP_FIND_LINKS"; echo "ci:$CI"; }} > "{record}"\n'
        f"exit {make_exit}\n",
    )
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    full_env.pop("PYTEST_ARGS", None)
    full_env.pop("CI", None)
    result = subprocess.run(
        [str(repo / ".ci" / "run")], env=full_env, capture_output=True, text=True, timeout=60
    )
    return result, record.read_text().splitlines(), workdir


@pytest.mark.parametrize("make_exit", [1, 2, 5])
def test_ci_fails_when_make_test_fails(tmp_path, make_exit):
    result, _, _ = ci_run(tmp_path, make_exit, with_shared=False, PIP_FIND_LINKS="/opt/wheels")
    assert result.returncode == make_exit
    assert "FAILED" in result.stderr


def test_ci_runs_the_test_command_and_appends_the_shared_wheels(tmp_path):
    result, call, workdir = ci_run(tmp_path, 0, with_shared=True, PIP_FIND_LINKS="/opt/wheels")
    assert result.returncode == 0, result.stderr
    assert call[0] == "args:test PYTEST_ARGS=-ra"
    assert call[1] == f"find_links:/opt/wheels {(workdir / 'shared' / 'wheels').resolve()}"
    assert call[2] == "ci:true"


def test_ci_keeps_find_links_without_shared_wheels(tmp_path):
    _, call, _ = ci_run(tmp_path, 0, with_shared=False, PIP_FIND_LINKS="/opt/wheels /mirror")
    assert call[1] == "find_links:/opt/wheels /mirror"


def make_dry_run(*args: str) -> str:
    return subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(REPO_ROOT), *args],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout


def test_make_test_sets_up_first_and_passes_pytest_args():
    lines = make_dry_run("test", "PYTEST_ARGS=-m slow -x").splitlines()
    assert lines[0] == "bash scripts/setup.sh" and lines[-1] == ".venv/bin/python -m pytest -m slow -x"
    # between them: the example plugin packages installed editable, so their own tests run with megatron's
    middle = " ".join(lines[1:-1])
    for package in ("megatron-ks-similarity", "megatron-meta-sgd", "megatron-voc-dataset"):
        assert f"-e examples/{package}/" in middle


def test_make_run_starts_the_main_job():
    lines = make_dry_run("run").splitlines()
    assert lines == [
        "bash scripts/setup.sh",
        ".venv/bin/megatron run --learner reptile --detector yolox",
    ]
