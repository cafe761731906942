# llm_scratch: `make lab` opens the notebooks, `make test` runs every test and notebook.
# Both create .venv on first use. Override PYTHON, TORCH or JOBS on the command line.

PYTHON ?= python3
VENV   ?= .venv
# torch is installed on its own first, pinned, so that `pip install -e .[dev]` finds it satisfied
# and never pulls a different (multi-GB CUDA) build. Where a local CPU wheel of this version is on
# pip's find-links path it is taken from there; elsewhere pip installs it the ordinary way.
# Use another build with e.g. `make TORCH="torch==2.13.0 --index-url <your index>" test`.
TORCH  ?= torch==2.13.0
JOBS   ?= 2

BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# one torch thread per pytest worker: JOBS workers share the cores instead of fighting over them
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
NOTEBOOKS := $(sort $(wildcard notebooks/*/*.ipynb))
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup lab test unit nbtest lint notebooks bench artifacts clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "llm_scratch needs Python >= 3.11; run e.g. 'make PYTHON=python3.11 $(MAKECMDGOALS)'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	touch $@

lab: setup
	$(BIN)/jupyter lab --notebook-dir=notebooks $(ALLOW_ROOT)

# The whole suite: lint, unit and reference tests, then every notebook through nbval
# (a notebook's cells run in order on one kernel: --dist loadfile keeps a file on one worker).
test: setup
	$(BIN)/ruff check .
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env \
		--durations=15 tests notebooks

unit: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) tests

nbtest: setup
	$(TEST_ENV) $(BIN)/python -m pytest -n $(JOBS) --dist loadfile --nbval-lax --nbval-current-env notebooks

lint: setup
	$(BIN)/ruff check .

# Re-execute every notebook in place, top to bottom, and store its outputs.
notebooks: setup
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; start=$$(date +%s); \
		MPLBACKEND=module://matplotlib_inline.backend_inline $(BIN)/jupyter nbconvert --to notebook --execute \
			--inplace --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
		echo "   $$(( $$(date +%s) - start )) s"; \
	done

bench: setup
	$(BIN)/python tests/benchmarks/run.py

# Rebuild the small committed checkpoints under data/checkpoints/ from the package's own training
# functions (fixed seeds; each writes its config, seed, data, steps and loss log beside it).
artifacts: setup
	$(BIN)/python -m llm_scratch.artifacts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
