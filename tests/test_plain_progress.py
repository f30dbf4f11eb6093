"""Plain progress off a terminal: `megatron run` with stdout to a pipe prints stage, step and evaluation lines,
line by line, without terminal control codes; the interval rule (every N steps or 30 s); tables at full width."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from megatron.runtime.console import output_console, print_full_width
from megatron.training.progress import PlainProgress, run_progress

TESTS = Path(__file__).resolve().parent
# CSI / OSC escape sequences and bare carriage returns: what a live display writes
CONTROL = re.compile(r"\x1b\[|\x1b\]|\r")

TINY_RUN = [
    "run", "--learner", "reptile", "--detector", "tiny", "--meta-epochs", "1", "--no-baseline", "--no-pretrain",
    "--log-every", "2",
    "--set", "data.datasets=[{plugin: blobs, options: {images_per_task: 16}}]", "--set", "data.target=target",
    "--set", "data.shots=6", "--set", "data.eval_images=6", "--set", "data.input_size=64",
    "--set", "training.finetune_epochs=1", "--set", "training.steps_per_epoch=5", "--set", "output.plots=false",
    "--set", "output.save_models=false",
]


def _run_piped(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "MEGATRON_PLUGINS": "tiny_detector", "MEGATRON_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1",
           "COLUMNS": "80", "TERM": "xterm-256color"}
    cmd = [sys.executable, "-m", "megatron", *TINY_RUN, "--out", str(tmp_path / "runs")]
    return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          cwd=tmp_path)


@pytest.mark.slow  # a whole `megatron run` in a subprocess: about a minute on a shared 2-core machine
def test_a_run_with_stdout_to_a_pipe_prints_stage_step_and_evaluation_lines_without_control_codes(tmp_path):
    proc = _run_piped(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    lines = out.splitlines()
    assert any(re.search(r"\[prepare\] start", line) for line in lines), out
    assert any(re.search(r"\[meta_epoch\] start reptile meta_epoch=1 steps=\d+", line) for line in lines), out
    assert any(re.search(r"\[meta_train\] end reptile", line) for line in lines), out
    steps = [line for line in lines if re.search(r"\[meta_train\] reptile meta-epoch 1 step \d+/\d+ loss ", line)]
    # --log-every 2 over the meta-epoch's outer steps: the first, every second and the last
    assert len(steps) >= 3, out
    assert all("ETA" in line and "steps/s" in line for line in steps)
    assert any("image passes/s" in line for line in steps[1:]), steps
    assert any(re.search(r"\[evaluate\] reptile meta-epoch 1 heldout: mAP50 \d+\.\d% FROC", line) for line in lines)
    assert not CONTROL.search(out), repr(out[:2000])
    assert not CONTROL.search(proc.stderr), repr(proc.stderr[:2000])
    # the results table at its full width: the headers are whole even at COLUMNS=80
    assert "mAP50:95" in out and "compute" in out and "…" not in out


def test_a_step_line_comes_every_n_steps_or_after_30_seconds_whichever_first():
    now = [0.0]
    stream = io.StringIO()
    plain = PlainProgress(stream, log_every=10, clock=lambda: now[0])
    plain.megatron_stage_start("meta_epoch", {"learner": "maml", "meta_epoch": 1, "steps": 100})
    for step in range(1, 26):
        now[0] += 1.0
        plain.megatron_meta_step_end("maml", 1, step, {"loss": 0.5, "compute_spent": 40.0 * step})
    now[0] += 45.0  # a slow step: due by time before the next multiple of 10
    plain.megatron_meta_step_end("maml", 1, 26, {"loss": 0.25, "compute_spent": 40.0 * 26})
    steps = [line.split(" step ")[1].split()[0] for line in stream.getvalue().splitlines() if " step " in line]
    assert steps == ["1/100", "11/100", "21/100", "26/100"]
    last = stream.getvalue().splitlines()[-1]
    # 26 steps in 70 s; 1000 image passes in the 69 s since step 1; 74 steps left at 70/26 s each
    assert "loss 0.2500" in last and "0.37 steps/s" in last and "14.5 image passes/s" in last and "ETA 3m19s" in last


def test_stage_one_steps_reach_the_plain_lines_through_the_bar_interface():
    stream = io.StringIO()
    plain = PlainProgress(stream, log_every=3)
    job = plain.bar.add_task("pretrain", total=7)
    for _ in range(7):
        plain.bar.update(job, advance=1, description="pretrain epoch 1/1 loss 0.500")
    plain.bar.remove_task(job)
    steps = [line for line in stream.getvalue().splitlines() if "[pretrain] step" in line]
    assert [line.split("step ")[1].split()[0] for line in steps] == ["1/7", "4/7", "7/7"]


def test_a_terminal_gets_no_plain_lines_and_a_file_gets_them():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with run_progress(True, stream=io.StringIO()) as shown:
        assert isinstance(shown, PlainProgress)
    with run_progress(True, stream=Terminal()) as shown:
        assert not isinstance(shown, PlainProgress)  # rich bars (on stderr, when it is a terminal) or nothing
    with run_progress(False, stream=io.StringIO()) as shown:
        assert shown is None


def test_a_wide_table_printed_to_a_file_is_not_cut_to_80_columns():
    table = Table()
    for name in ("learner", "mAP50", "mAP50:95", "precision", "recall", "F1", "FROC", "compute (image passes)",
                 "epochs (baseline-equivalent)"):
        table.add_column(name)
    table.add_row("reptile", *(["12.3"] * 6), "1,234,567", "4 (44)")
    stream = io.StringIO()
    print_full_width(Console(file=stream, width=80), table)
    text = stream.getvalue()
    assert "compute (image passes)" in text and "epochs (baseline-equivalent)" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_a_benchmark_off_a_terminal_prints_a_line_per_finished_cell(tmp_path, capsys):
    import _benchmark_fakes as fakes
    from megatron.benchmark import grid as bm

    bcfg = bm.load_benchmark_config(None, {"learners": ["reptile"], "seeds": [0], "budget": 600, "controls": False})[0]
    res = bm.run_benchmark(bcfg, {"data": {"sources": fakes.SOURCES}}, tmp_path, runner=fakes.failing_runner,
                           progress=True, report=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if "[benchmark]" in line]
    assert len(lines) == len(res.ran) == 2
    assert lines[-1].endswith(f"[benchmark] 2/2 cells done: {res.ran[-1]}") and not CONTROL.search("".join(lines))


def test_a_long_text_line_printed_off_a_terminal_is_written_whole(capsys):
    # a batch job's log: a path or a fix wrapped at rich's default 80 columns cannot be copied back out
    line = "fix: point similarity.unlabelled_target at " + "/a/very/long/folder" * 8 + " (not the target's folder)"
    output_console().print(line, highlight=False)
    assert capsys.readouterr().out == line + "\n"


def test_every_command_s_table_printed_to_a_pipe_keeps_its_headers_whole(capsys):
    from megatron.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and max(len(line) for line in out.splitlines()) > 80
    assert not CONTROL.search(out)
