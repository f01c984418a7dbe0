# Set-up is part of every target: `make demo` and `make test` work on a fresh machine.
# TORCH_SPEC picks the PyTorch build; GPU users can override it, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.4
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean bench-data

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m deployments.demo $(DEMO_ARGS)

bench-data: $(STAMP)
	$(PY) bench/data.py

clean:
	rm -rf $(VENV) workspace .pytest_cache
