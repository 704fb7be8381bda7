# Two commands do everything on a fresh machine: `make run` and `make test`.
# `make install` builds only the environment, for a worker or front-end host that runs `ltxbot` itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torchaudio 2.11 imports beside torch 2.14.1; set TORCH_SPEC to match your CUDA if you need another build.
TORCH_SPEC ?= torch==2.14.1 torchaudio==2.11.0
STAMP := $(VENV)/.installed
# The LTX-Video family's own interpreter: ltx-video pins transformers<4.52, which ltx-core cannot use.
# `make run` and `make install` build it only when config.yaml enables ltxv; `make test` always does (the tests use it).
LTXV_VENV := .venv-ltxv
LTXV_STAMP := $(LTXV_VENV)/.installed
LTXV_SPEC ?= $(firstword $(TORCH_SPEC)) ltx-video[inference]==0.1.2 diffusers==0.39.0 transformers==4.51.3 \
	huggingface-hub==0.36.2 pydantic>=2.7,<3 sentencepiece

.PHONY: install run test lint clean ltxv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(LTXV_STAMP): pyproject.toml Makefile
	test -x $(LTXV_VENV)/bin/python || $(PYTHON) -m venv $(LTXV_VENV)
	$(LTXV_VENV)/bin/pip install --quiet --upgrade pip
	$(LTXV_VENV)/bin/pip install --quiet $(foreach spec,$(LTXV_SPEC),'$(spec)')
	# Only our generator package: its own dependencies are ltx-core's stack, not this one.
	$(LTXV_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(LTXV_STAMP)

ltxv: $(LTXV_STAMP)

install: $(STAMP)
	@if $(BIN)/ltxbot config needs-ltxv-venv 2>/dev/null; then $(MAKE) --no-print-directory ltxv; fi

run: install
	@$(BIN)/ltxbot run

test: $(STAMP) $(LTXV_STAMP)
	$(BIN)/ruff check bot generator bench tests
	$(BIN)/mypy
	@# The suite starts its own PostgreSQL server; this installs the binaries when they are missing.
	./scripts/ensure-postgres.sh
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check bot generator bench tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(LTXV_VENV) .pytest_cache .mypy_cache .ruff_cache
