# Two commands for a fresh machine:  make demo  (the main job)  ·  make test  (the test suite)
# Each creates .venv and installs the pinned versions from constraints.txt on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench lint

# lmms_eval (--lmms-tasks) goes in without its torchvision, timm and wandb pin (lmms-requirements.txt)
$(VENV)/.installed: pyproject.toml constraints.txt setup.py lmms-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,plot,eval,track,lora]"
	$(PY) -m pip install -q -c constraints.txt --no-deps lmms_eval
	$(PY) -m pip install -q -c constraints.txt -r lmms-requirements.txt
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
