# pneumo_ray: `make demo` runs the training job end to end, `make test` runs the test suite.
# Both create .venv when it is missing and install the project into it.

# The project's folder: `make -f path/to/Makefile demo` works from any folder (paths such as
# out/demo are then relative to that folder, as a user's relative paths would be).
HERE := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
PYTHON ?= python3
VENV ?= $(HERE)/.venv
PY := $(VENV)/bin/python
DATA ?=
OUT ?= out/demo
DEMO_FLAGS ?= --image-size 64 --epochs 5 --lr-binary 1e-3
# torch/torchvision pinned to the releases this machine has on disk (pyproject caps them).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo demo-jobs test test-fast quality site-adaptation device-check docs docs-build lint format venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: $(HERE)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '$(HERE)[dev]'
	touch $@

demo: venv
	@$(MAKE) --no-print-directory -f $(HERE)/Makefile demo-jobs

# The demo's job commands alone, with relative paths as a user types them
# (tests/test_paths.py runs them twice from a temporary folder).
demo-jobs:
ifeq ($(DATA),)
	test -f out/demo_store/SYNTHETIC.txt || $(PY) -m pneumo_ray.io.synthetic out/demo_store
	$(PY) $(HERE)/jobs/train.py --data out/demo_store --output $(OUT) $(DEMO_FLAGS)
	$(PY) $(HERE)/jobs/score.py --model $(OUT) --input out/demo_store --output $(OUT)_scores
else
	$(PY) $(HERE)/jobs/train.py --data $(DATA) --output $(OUT) $(DEMO_FLAGS)
	$(PY) $(HERE)/jobs/score.py --model $(OUT) --input $(DATA)/test --output $(OUT)_scores
endif

# The quality run: a profile (lite, the default: ImageNet EfficientNet-Lite0 fine-tuned at
# 224 px within 90 minutes on 2 cores; cpu-hour: the seed CNNs at 128 px; gpu: Lite2 at 256 px
# on a GPU machine) on the shared Kermany images, then the test-split evaluation with
# bootstrap CIs, printed against the targets.
QUALITY_DATA ?= ../shared/data/chest_xray
QUALITY_PROFILE ?= lite
quality: venv
	$(PY) jobs/quality.py --data $(QUALITY_DATA) --output out/quality --profile $(QUALITY_PROFILE)

# What adapting the quality bundle to the test site gives (pneumo-adapt, cross-fitted: each half
# of the test patients predicted by the bundle adapted on the other half); about 2 minutes.
SITE_FLAGS ?=
site-adaptation: venv
	$(PY) benchmarks/site_adaptation.py --model out/quality --data $(QUALITY_DATA) $(SITE_FLAGS)

# The GPU device check (a GPU machine; about 6.5 minutes on one H200 with a subset of the store):
# each limit of the node (GPU-only training steps; CPU, nvJPEG and model-only scoring) beside
# the training and scoring jobs' steady state, and CPU scoring of the same images
# (README, "GPU device check").
device-check: venv
	$(PY) benchmarks/device_check.py --data $(QUALITY_DATA) --fullres ../shared/data/chest_xray_fullres

test: venv docs-build
	$(PY) -m ruff check pneumo_ray jobs benchmarks tests
	$(PY) -m pytest

# The manual (docs/, MkDocs): a strict build fails on a broken link or a missing page; the job
# options pages are generated from the parsers at build time (docs/hooks.py).
docs-build: venv
	cd $(HERE) && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs: venv
	cd $(HERE) && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

# Between edits: the tests that start no Ray and train nothing (about a minute here).
test-fast: venv
	$(PY) -m ruff check pneumo_ray jobs benchmarks tests
	$(PY) -m pytest --fast -q

lint: venv
	$(PY) -m ruff check pneumo_ray jobs benchmarks tests
	$(PY) -m ruff format --check pneumo_ray jobs benchmarks tests

format: venv
	$(PY) -m ruff format pneumo_ray jobs benchmarks tests
	$(PY) -m ruff check --fix pneumo_ray jobs benchmarks tests

clean:
	rm -rf out .pytest_cache .ruff_cache
