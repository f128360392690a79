# diffusion_lab — `make help` lists the targets.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install train test lint format bench clean

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev tools

train: $(STAMP) ## train the default pixel model on the embedded digits (ARGS="model.lr=1e-4 ..." to override)
	$(VENV)/bin/diffusion-lab train $(ARGS)

TEST_WORKERS ?= 2
test: $(STAMP) ## run the test suite (offline, CPU; TEST_WORKERS=2 pytest-xdist processes)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest -n $(TEST_WORKERS) $(ARGS)

lint: $(STAMP) ## ruff check + format check + the import layers (import-linter)
	$(VENV)/bin/ruff check diffusion_lab tests
	$(VENV)/bin/ruff format --check diffusion_lab tests
	$(VENV)/bin/lint-imports

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix diffusion_lab tests
	$(VENV)/bin/ruff format diffusion_lab tests

bench: $(STAMP) ## project training step vs a plain PyTorch loop (one JSON line)
	$(VENV)/bin/diffusion-lab bench train $(ARGS)

clean: ## remove run outputs (not the venv)
	rm -rf outputs multirun .pytest_cache
