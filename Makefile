# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	# torchvision outside site-packages: PyPI's x86_64 wheel is a CUDA build whose ops don't load beside the CPU
	# torch, and a broken torchvision there breaks `import transformers`; tests/torchvision_cpu.py loads it.
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/torchvision-cpu torchvision==0.28.0
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lossport demo

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy src/lossport

test: $(STAMP) lint
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
