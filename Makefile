# Two entry points, both idempotent on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

DEB_PACKAGES := openclipart-png dataset-fashion-mnist
DATA_STAMP := .cache/.debian-data

.PHONY: demo test lint bench bench-scale gpu-check gpu-wheels gpu-check-bare clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Local wheels of this machine kind; the pip constraint keeps torch at 2.14.1.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

# Real images and labels ship as Debian packages; without root the tests that need them skip.
$(DATA_STAMP):
	@mkdir -p .cache
	@if dpkg -s $(DEB_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES) >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES) >/dev/null; } \
		|| echo "warning: apt-get could not install $(DEB_PACKAGES); the tests that need them skip"; \
	else echo "note: install the Debian packages $(DEB_PACKAGES) for the real-data tests and the demo"; fi
	@touch $@

test: $(STAMP) $(DATA_STAMP)
	$(PY) -m ruff check trainer pruning tools tests bench
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# Prune a real DINOv2 ViT-S/14 with DGMR, distill it on 2 CPU ranks, evaluate; prints the report path.
demo: $(STAMP) $(DATA_STAMP)
	$(PY) -m tools.demo --out demo_out

lint: $(STAMP)
	$(PY) -m ruff check trainer pruning tools tests bench

# Each benchmark prints ratios against a baseline measured in the same run and writes bench/results/.
bench: $(STAMP)
	$(PY) -m bench.select
	$(PY) -m bench.overhead
	$(PY) -m bench.data

# Writes a full-size EVA02-E-14-plus checkpoint (~9 GB) to a temporary folder and prunes it.
bench-scale: $(STAMP)
	$(PY) -m bench.stream_prune

# One CUDA GPU, <= 8 minutes: the gpu test tier and a short bf16 ViT-g-14 distillation on NCCL, one table
# (images/s, TFLOP/s, MFU, peak memory against the planner). Without CUDA it says so and exits 2.
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py

# The same on a GPU machine whose python3 already holds CUDA torch and nothing can be fetched (docs/planner.md):
# `make gpu-wheels` here puts the packages it lacks in .whl/ (x86-64, Python 3.12); there, with .whl carried,
# `make gpu-check-bare` installs them beside its own and runs the check from this checkout.
GPU_WHEELS := open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4 timm==1.0.31
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)

gpu-check-bare:
	$(PYTHON) -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-site .whl/*.whl
	PYTHONPATH=/tmp/gpu-site:$(CURDIR) PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_check.py

clean-venv:
	rm -rf $(VENV)
