# promptmill: `make demo` and `make test` do all set-up on a fresh machine (venv, torch CPU build, project).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: help setup chromium demo test lint bench data checkpoints eval
help:  ## list targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(VENV)/.installed chromium  ## venv + torch==2.13.0 (local CPU build, first) + project with test extras + chromium

chromium:  ## Debian's chromium for the headless report test (apt; needs root, as on CI)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

demo: setup  ## run the demo job on an embedded Ray -> runs/demo/
	$(VENV)/bin/promptmill generate examples/demo.yaml

test: setup  ## the test suite (CI runs exactly this)
	$(PY) -m pytest -q

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

bench: setup  ## benchmarks (ratios measured side by side)
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/generators.py

# ---- shipped checkpoints: the documented recipes (one at a time: two torch jobs on 2 cores run 10x slower)
DATA := data/shapes
TRAIN := $(VENV)/bin/promptmill train
data: setup  ## render the shapes train/test splits
	$(VENV)/bin/promptmill dataset shapes --rows 60000 --split train --out $(DATA)/train
	$(VENV)/bin/promptmill dataset shapes --rows 2000 --split test --out $(DATA)/test
	$(VENV)/bin/promptmill dataset shapes --rows 60000 --split full --out $(DATA)/full

checkpoints: data  ## train all shipped models from scratch, one at a time (see MODEL_CARD.md)
	$(TRAIN) judge --data $(DATA)/full --out checkpoints/judge --steps 1500 --batch-size 128
	$(TRAIN) vq --data $(DATA)/train --out checkpoints/vq --steps 2000 --batch-size 64 --threads 1
	$(TRAIN) transformer --data $(DATA)/train --vq checkpoints/vq --out checkpoints/dalle --steps 3000 \
		--batch-size 64 --model n_layer=5 --model n_embd=224
	$(TRAIN) clip --data $(DATA)/train --out checkpoints/clip --steps 2500 --batch-size 128
	$(TRAIN) gan --data $(DATA)/train --clip checkpoints/clip --out checkpoints/gan --steps 2500 --batch-size 64 \
		--model text_in_fc=true

eval: setup  ## prompt-match, judge accuracy, VQ ceiling, CLIP R-precision, rerank gain (needs `make data`)
	$(VENV)/bin/promptmill eval-models
