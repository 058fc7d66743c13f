# Setup and everyday commands. Every target creates .venv and installs pixelda into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PORT ?= 5000
# Data, seed and recipe (a conf/experiment name) of `make reproduce`. The default recipe is the
# README's recommended one (PixelDA plus self-training).
DATA_ROOT ?= ../shared/data
SEED ?= 0
RECIPE ?= cpu_hour_selftrain
# Extra Hydra overrides, e.g. make train ARGS="train.epochs=2"
ARGS ?=

.PHONY: install train test ui bench reproduce

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

# The RECIPE on DATA_ROOT, then the evaluate JSON line of its best checkpoint (last line).
reproduce: $(STAMP)
	$(PY) -m pixelda.train experiment=$(RECIPE) data.root=$(DATA_ROOT) seed=$(SEED) train.progress=false \
		hydra.run.dir=outputs/reproduce/$(RECIPE)/seed$(SEED) $(ARGS)
	$(PY) -m pixelda.evaluate checkpoint=outputs/reproduce/$(RECIPE)/seed$(SEED)/checkpoints/best.pt split=auto
