# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# the editable install compiles nothing, and PYTHONDONTWRITEBYTECODE (set on some machines)
	# keeps Python from caching it: each worker process would compile kd_optuna again
	$(BIN)/python -m compileall -q kd_optuna > /dev/null
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m kd_optuna.run.demo

# pytest-xdist: one test process per core, at most 4 (each test may start workers of its own)
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .kd_optuna_cache
