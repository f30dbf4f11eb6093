"""The names of the files a run directory and a benchmark cell hold — one constant per file, used by the
writers (record, rundir, recorder, grid) and the readers (benchmark rows and report)."""
from __future__ import annotations

RECORD_FILE = "run.json"  # the run record (megatron.training.record)
CELL_FILE = "cell.json"  # a benchmark cell's definition (megatron.benchmark.grid)
SUMMARY_FILE = "summary.md"  # the run's summary table
CONFIG_FILE = "config.yaml"  # the run's effective config
ERROR_FILE = "error.txt"  # a failed benchmark cell's traceback
CURVE_FILE = "map50_curve.png"  # mAP50 against compute per learner
FROC_FILE = "froc_curve.png"  # megatron.training.plots.plot_froc

#: what a committed benchmark cell keeps (never checkpoints or models)
CELL_RECORD_FILES = (CELL_FILE, RECORD_FILE, ERROR_FILE)
