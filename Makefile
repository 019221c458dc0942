# Two commands do everything: `make demo` (the main job) and `make test` (the test suite).
# Both build their own virtualenv in .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local CPU build of torch; a looser pin would pull a multi-GB CUDA build. setup.cfg only asks
# for torch>=2.4, so installing this first keeps pip from replacing it.
TORCH ?= torch==2.13.0
# Extras: every library extra (sb3, envs, offline) for `make demo`, plus the test tools for `make test`.
EXTRAS ?= all,test

.PHONY: venv test test-all demo clean

$(STAMP): setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

## Unit + integration tests on CPU (tiny presets); slow end-to-end tests are deselected.
test: $(STAMP)
	$(BIN)/python -m pytest

## Everything, including tests marked slow.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

## The main job: SB3 SAC (UTD=20) + SynthER on DMC cheetah-run, CPU-sized, writes runs/demo/.
demo: $(STAMP)
	$(BIN)/synther train --out runs/demo

clean:
	rm -rf $(VENV) runs *.egg-info
