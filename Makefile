# One entry point for a new user: `make study` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision builds this machine provides (x86_64; aarch64 gets 2.9.1/0.24.1).
# Override elsewhere, e.g. `make TORCH_SPEC="torch torchvision" test`.
ifeq ($(shell uname -m),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
STAMP := $(VENV)/.egeunet-installed
STUDY ?= studies/quick.yaml

.PHONY: setup test test-slow bench study lint format complexity clean gpu-bundle notebook-filter

setup: $(STAMP) notebook-filter

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name egeunet --display-name egeunet
	touch $(STAMP)

# Notebooks saved from JupyterLab keep their outputs on disk, never in git: .gitattributes
# sends notebooks/*.ipynb through this clean filter (nbstripout, cell ids kept, plus the
# language_info JupyterLab adds). Outside a git checkout there is nothing to set up.
NBSTRIPOUT := "$(abspath $(BIN)/python)" -m nbstripout --keep-id
notebook-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	    git config filter.nbstripout.clean '$(NBSTRIPOUT)' && \
	    git config filter.nbstripout.smudge cat && \
	    git config filter.nbstripout.extrakeys metadata.language_info && \
	    git config diff.ipynb.textconv '$(NBSTRIPOUT) -t' && \
	    echo "notebook outputs are stripped on commit (git filter nbstripout)"; \
	fi

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_onnx.py
	$(BIN)/egeunet complexity

study: $(STAMP)
	$(BIN)/egeunet study $(STUDY)

complexity: $(STAMP)
	$(BIN)/egeunet complexity --micro

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The ISIC 2017 data the GPU check needs, where the device tool can carry it (ignored).
gpu-bundle:
	mkdir -p data/gpu-bundle
	cp -r ../shared/data/isic2017 data/gpu-bundle/
