# `make serve` and `make test` each set up .venv themselves (torch pinned to the CPU build on this disk).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: serve test lint format bench venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.serve: pyproject.toml | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[server]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[server,train,dev,triton]'
	touch $@ $(VENV)/.serve

venv: $(VENV)/.dev

serve: $(VENV)/.serve
	$(VENV)/bin/gam-serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(VENV)/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.dev
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
