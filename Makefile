# Two entry points, both idempotent on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Local wheels of this machine kind; the pip constraint keeps torch at 2.14.1.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check trainer pruning tests bench
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m pruning.demo

lint: $(STAMP)
	$(PY) -m ruff check trainer pruning tests bench

bench: $(STAMP)
	$(PY) bench/select.py

clean-venv:
	rm -rf $(VENV)
