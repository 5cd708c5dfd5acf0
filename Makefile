# Two entry points for users and CI: `make run` (the main job) and `make test` (the suite).
# Both create .venv with the pinned requirements and this package on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean-results

$(STAMP): requirements.txt requirements-dev.txt requirements-export.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The main job on the default config (digits demo), then the results table.
run: $(STAMP)
	$(BIN)/snakemake --cores 4 --resources gpu=1

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow
	# pyflakes checks (unused imports, undefined names); workflow/scripts are left out: their
	# `snakemake` object is injected by Snakemake
	$(BIN)/ruff check --select F src tests benchmarks

clean-results:
	rm -rf results/*/ .snakemake
