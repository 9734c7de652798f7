# Two entry points: `make demo` (train -> compress -> evaluate on the synthetic default) and
# `make test`.  Both build .venv from the committed lock when it is missing; nothing in here can
# pull a CUDA torch (everything is installed with --no-deps from requirements/cpu.lock).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): requirements/cpu.lock pyproject.toml setup.py $(wildcard torchrec_compress/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/cpu.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m examples.dlrm.main --dataset synthetic --epochs 2 \
		--compress afm --budget-ratio 4 --finetune-epochs 1 --out runs/demo

# lint and type checks first (seconds), then the tests and the library's docstring examples
test: lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH TORCHREC_COMPRESS_REQUIRE_KERNELS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
