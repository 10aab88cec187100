# Two commands for a fresh machine:  make demo  (the main job)  ·  make test  (the test suite)
# Each creates .venv and installs the pinned versions from constraints.txt on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench lint

$(VENV)/.installed: pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,plot,eval,track,lora]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/mmunlearn demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/run.py
	$(PY) -m pytest -q bench --benchmark-only

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
