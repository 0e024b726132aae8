# Two entry points: `make serve` and `make test`. Both build .venv from nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PAGODA := $(VENV)/bin/pagoda
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct

.PHONY: setup model serve test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

model: setup
	$(PAGODA) pull $(MODEL)

serve: model
	$(PAGODA) generate --chat --model $(MODEL) "What is the capital of France?"

test: model
	$(PAGODA) pull gemma3-270m
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
