# mosc: two commands on a fresh machine.
#   make demo   set up .venv and run the main job on the built-in default
#   make test   set up .venv and run the default test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/mosc demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
