# Two entry points: `make serve` and `make test`. Both build .venv from nothing but python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PAGODA := $(VENV)/bin/pagoda
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct

.PHONY: setup model browser serve test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

model: setup
	$(PAGODA) pull $(MODEL)

# The web page test drives Debian's Chromium (never a downloaded browser); installed here when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=

# e.g. make serve SERVE_ARGS="-tp 2"
serve: model
	$(PAGODA) serve $(MODEL) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: model browser
	$(VENV)/bin/ruff check .
	$(PAGODA) pull gemma3-270m
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
