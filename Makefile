# Two commands on a fresh machine with Python 3.11 and make: `make demo` and `make test`.
# Both create .venv when it is missing; the install step reruns only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ctvlab-installed
CONFIG ?= jobs/configs/demo.yaml
PYTEST_ARGS ?=
GPU_BUNDLE ?= .gpu-bundle
GPU_PYTHON ?= 3.12

CHROMIUM ?= /usr/bin/chromium

.PHONY: browser demo test lint format ui schemas docs docs-reference bench clean venv constraints gpu-bundle

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "ctvlab needs Python 3.11; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -rf platform/ctvlab.egg-info  # build metadata of the editable install; the venv holds its own copy
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ctvlab run --config $(CONFIG)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's Chromium, for the tests that open the report's viewer and the MLflow UI in a headless browser:
# installed once with apt-get where it is missing and this user may install packages; elsewhere those
# tests are skipped and say why.
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& echo "installing Debian's chromium for the browser tests" \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "no Chromium at $(CHROMIUM) and no way to install it here: the browser tests will be skipped" 

lint: $(STAMP)
	$(BIN)/ruff check platform tests jobs benchmarks
	$(BIN)/ruff format --check platform tests jobs benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix platform tests jobs benchmarks
	$(BIN)/ruff format platform tests jobs benchmarks

# MLflow UI over the local store, on the loopback address only.
ui: $(STAMP)
	$(BIN)/ctvlab ui

schemas: $(STAMP)
	$(BIN)/ctvlab schemas --out schemas

# The manual's generated pages (every command's options, every config key), then the site in build/site.
docs-reference: $(STAMP)
	$(BIN)/python -m ctvlab.docsgen docs/reference

docs: docs-reference
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Pin every installed dependency at its current version (after changing pyproject.toml's dependencies).
constraints: $(STAMP)
	@{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | grep -v '^ctvlab' | sed 's/+cpu$$//'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt

# What benchmarks/gpu_check.py needs on a GPU machine that has PyTorch and no network: MONAI's and
# pydantic's wheels for Python $(GPU_PYTHON) and a few prepared synthetic patients, into $(GPU_BUNDLE)
# (git-ignored; send it along with the code). Prints its size. See docs/gpu.md.
gpu-bundle: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --build-bundle $(GPU_BUNDLE) --wheel-python $(GPU_PYTHON)

clean:
	rm -rf runs mlflow.db mlruns mlartifacts .pytest_cache
