# Setup and everyday commands. Every target creates .venv and installs pixelda into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 5000
# Extra Hydra overrides, e.g. make train ARGS="train.epochs=2"
ARGS ?=

.PHONY: install train test ui bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m pixelda.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

ui: $(STAMP)
	mkdir -p mlruns
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port $(PORT)

bench: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)
