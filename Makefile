# `make demo` and `make test` are all the set-up a fresh machine needs: both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/unet-edge
STAMP := $(VENV)/.installed
# PyTorch wheels known to install offline here; override with `make TORCH_PKGS="torch torchvision"`.
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PKGS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
endif
DEMO_EPOCHS ?= 20

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(CLI) train --epochs $(DEMO_EPOCHS) --name demo
	$(CLI) eval --json runs/demo-eval.json
	$(CLI) export --format all
	$(CLI) verify --json runs/demo-verify.json
	$(CLI) bench --batch-sizes 1,8 --seconds 1.5 --json runs/demo-bench.json
	$(CLI) predict "$$($(PY) -c 'from unet_edge.export import find_latest_export; print(find_latest_export() / "model.onnx")')" \
		"$$($(PY) -c 'from unet_edge.synth import default_data_dir; print(default_data_dir() / "val" / "images")')" --limit 4 --out runs/demo-predict

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs exported/*/ .pytest_cache
