# The two set-up commands of the README: `make demo` (main job) and `make test` (test suite).
# Each creates .venv, installs torch==2.13.0 pinned (an unpinned torch pulls the CUDA build)
# and kdguard with its dependencies, then runs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdguard-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kdguard demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
