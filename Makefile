# Two commands for a newcomer: `make run` and `make test`. Both set everything up first
# (scripts/setup.sh: a few seconds once the environment exists).
VENV        := .venv
PYTHON      := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS  ?= --quick

.PHONY: setup run test example-plugins bench clean

setup:
	bash scripts/setup.sh

# the main job on the built-in data
run: setup
	$(VENV)/bin/megatron run --learner reptile --detector yolox

# the example plugin packages (examples/megatron-*/) are installed into the venv as a third party would
# (editable, through their entry points) so that their own tests run with megatron's
EXAMPLE_PLUGINS := $(wildcard examples/megatron-*/pyproject.toml)

# extra pytest arguments: make test PYTEST_ARGS="-m slow"
test: setup example-plugins
	$(PYTHON) -m pytest $(PYTEST_ARGS)

example-plugins: setup
	@$(PYTHON) -c "import megatron_ks_similarity, megatron_meta_sgd, megatron_voc_dataset" 2>/dev/null || \
	$(PYTHON) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation \
		$(foreach p,$(EXAMPLE_PLUGINS),-e $(dir $(p)))

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
