# promptmill: `make demo` and `make test` do all set-up on a fresh machine (venv, torch CPU build, project).
VENV ?= .venv
TORCH_INDEX ?=  # e.g. https://download.pytorch.org/whl/cpu: the CPU-only torch build on Linux (PyPI serves CUDA's)
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: help setup chromium demo test test-ray-range chaos lint bench bench-gpu bench-scale bench-planning data checkpoints eval spec-docs
help:  ## list targets
	@grep -E '^[a-z]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

setup: $(VENV)/.installed  ## venv + torch==2.13.0 (local CPU build, first) + project with test and diffusers extras; no root

chromium:  ## the report test's headless browser: Debian's chromium via apt when root (as on CI), else say how
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	else \
		echo "make test needs a headless Chromium on PATH: 'sudo apt-get install chromium' (Debian/Ubuntu)," \
		     "'brew install --cask chromium' (macOS) or your distribution's package"; exit 1; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[test,diffusers]"
	touch $@

demo: setup  ## run the demo job on an embedded Ray -> runs/demo/
	$(VENV)/bin/promptmill generate examples/demo.yaml

test: setup chromium  ## ruff, then the test suite (CI runs exactly this)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# the ends of pyproject's Ray range (tests/test_wheel.py keeps them in step); each gets a venv of its own
RAY_LOWEST := 2.54.0
RAY_HIGHEST := 2.60.0
RAY_TESTS := tests/test_job.py tests/test_cluster.py tests/test_submit.py tests/test_formats.py tests/test_preflight.py \
	tests/test_text_inputs.py tests/test_train.py
test-ray-range:  ## the Ray-facing tests on the lowest and the highest Ray that pyproject allows (~1 h on 2 cores)
	set -e; for v in $(RAY_LOWEST) $(RAY_HIGHEST); do \
		python3 -m venv .venv-ray-$$v; \
		.venv-ray-$$v/bin/pip install -q --upgrade pip; \
		.venv-ray-$$v/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
		.venv-ray-$$v/bin/pip install -q -e ".[test]" "ray[data,train,default]==$$v"; \
		echo "== Ray $$v"; .venv-ray-$$v/bin/python -m pytest -q -p no:cacheprovider $(RAY_TESTS); \
	done

chaos: setup  ## the long cases: fault injection (storage outages, throttling, kills) and slow end-to-end variants
	$(PY) -m pytest -q -m "chaos or slow"  # every long case, wherever it lives; the rest runs in make test
	PROMPTMILL_FUZZ_EXAMPLES=20 $(PY) -m pytest -q -s tests/test_fuzz.py

spec-docs: setup  ## regenerate docs/spec.md from the pydantic field descriptions (a test keeps it in sync)
	$(VENV)/bin/promptmill spec --markdown > docs/spec.md

lint: setup  ## ruff
	$(VENV)/bin/ruff check .

bench: setup  ## benchmarks (ratios measured side by side): the job against the bare model first
	$(PY) benchmarks/pipeline.py
	$(PY) benchmarks/generators.py
	$(PY) benchmarks/real_models.py

bench-gpu: setup  ## on a CUDA machine: the job against the bare model on the GPU, real-size models, GPU busy % (benchmarks/gpu.py)
	$(PY) benchmarks/gpu.py

bench-scale: setup  ## the job at 1k, 10k and 100k prompts (~25 min on 2 cores) -> docs/scale.png, then planning at 1M-100M rows
	$(PY) benchmarks/scale.py

bench-planning: setup  ## planning only (--dry-run over synthetic 1M / 10M / 100M-row inputs, resumes at 10M; ~20 min) -> docs/scale_planning.png
	$(PY) benchmarks/scale.py --planning-only --rows 1000000 10000000 100000000 --finished 1000000 10000000 \
		--resume-rows 10000000 --dedup-rows 10000000

# ---- shipped checkpoints: the documented recipes (one at a time: two torch jobs on 2 cores run 10x slower)
DATA := data/shapes
TRAIN := $(VENV)/bin/promptmill train
data: setup  ## render the shapes train/test/full splits and the near-miss corpus (judge training)
	$(VENV)/bin/promptmill dataset shapes --rows 60000 --split train --out $(DATA)/train
	$(VENV)/bin/promptmill dataset shapes --rows 2000 --split test --out $(DATA)/test
	$(VENV)/bin/promptmill dataset shapes --rows 60000 --split full --out $(DATA)/full
	$(VENV)/bin/promptmill dataset near-miss --rows 36000 --out $(DATA)/near-miss

RECIPES := pipelines/training/configs
checkpoints: data  ## train all shipped models from scratch, one at a time, from their versioned recipes
	for kind in judge vq transformer clip gan; do $(TRAIN) $$kind --config $(RECIPES)/$$kind.yaml || exit 1; done

eval: setup  ## MODEL_CARD's figures: geometry check one sample and best-of-K, prompt-match, judge, VQ, CLIP (needs `make data`; ~5 min)
	$(VENV)/bin/promptmill eval-models
