# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: setup browser demo test test-fast lint bench slurm-test clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins what was tested (torch 2.14.1 + torchvision 0.29.1 among them)
	$(BIN)/pip install -q -c constraints.txt -e '.[medical,slurm,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# Debian's Chromium for the annotation page's real-browser test (playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/sam-train fit recipe=medical_demo

test: setup browser
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

lint: setup
	$(BIN)/ruff check sam_train tests benchmarks

bench: setup
	$(BIN)/python benchmarks/train_step.py --model vit_t
	$(BIN)/python benchmarks/decoder_only.py
	$(BIN)/python benchmarks/data_loading.py

slurm-test: setup
	bash slurm/test_local_slurm.sh

clean:
	rm -rf $(VENV) runs outputs
