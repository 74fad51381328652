# `make serve` and `make test` each set up .venv themselves (torch pinned to the CPU build on this disk).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 8000
# lm-evaluation-harness gets its own venv: it needs huggingface_hub >= 1, the TGI client in .venv pins < 1
LM_EVAL_VENV := .venv-lm-eval
LM_EVAL      := lm-eval[api]==0.4.13

# Debian packages the browser tests (playground) and the live Prometheus tests drive. Installed only when one of
# their commands is missing from PATH; apt-get needs root, which we are on the development machines and CI.
SYSTEM_TOOLS := chromium chromedriver prometheus promtool

.PHONY: serve test lint format bench venv clean system-tools

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

$(LM_EVAL_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(LM_EVAL_VENV)
	$(LM_EVAL_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 '$(LM_EVAL)'
	touch $@

venv: $(VENV)/.dev

serve: $(VENV)/.serve
	$(VENV)/bin/gam-serve --host $(HOST) --port $(PORT)

system-tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "missing:$$missing -> apt-get install chromium chromium-driver prometheus"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver prometheus; \
	fi

test: $(VENV)/.dev $(LM_EVAL_VENV)/.installed system-tools
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	GAM_LM_EVAL_PYTHON=$(CURDIR)/$(LM_EVAL_VENV)/bin/python $(PY) -m pytest -q

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
	rm -rf $(VENV) $(LM_EVAL_VENV) .pytest_cache .ruff_cache .mypy_cache
