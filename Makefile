# promptmill: `make demo` and `make test` do all set-up on a fresh machine (venv, torch CPU build, project).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: help setup demo test lint bench
help:  ## list targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(VENV)/.installed  ## venv + torch==2.13.0 (local CPU build, first) + project with test extras

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

demo: setup  ## run the demo job on an embedded Ray -> runs/demo/
	$(VENV)/bin/promptmill generate examples/demo.yaml

test: setup  ## the test suite (CI runs exactly this)
	$(PY) -m pytest -q

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

bench: setup  ## benchmarks (ratios measured side by side)
	$(PY) benchmarks/pipeline.py
