# Two commands for a newcomer: `make run` and `make test`. Both set everything up first
# (scripts/setup.sh: a few seconds once the environment exists).
VENV        := .venv
PYTHON      := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS  ?= --quick

.PHONY: setup run test bench clean

setup:
	bash scripts/setup.sh

# the main job on the built-in data
run: setup
	$(VENV)/bin/megatron run --learner reptile --detector yolox

# extra pytest arguments: make test PYTEST_ARGS="-m slow"
test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# every benchmarks/bench_*.py, quick mode by default (make bench BENCH_ARGS= for the full runs)
bench: setup
	@set -e; found=0; \
	for script in benchmarks/bench_*.py; do \
		[ -f "$$script" ] || continue; found=1; \
		echo "== $$script $(BENCH_ARGS)"; \
		$(PYTHON) "$$script" $(BENCH_ARGS); \
	done; \
	[ "$$found" = 1 ] || echo "no benchmarks/bench_*.py yet"

# removes what the set-up and the tests made in the repository; the mmcv wheel cache
# (~/.cache/megatron/wheels) is kept so the next set-up skips the 24-minute build
clean:
	rm -rf $(VENV) build .pytest_cache benchmarks/out *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
