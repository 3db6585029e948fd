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

# The suite runs in one pytest worker per core (pytest-xdist, each test file whole on one worker, so a file's shared
# fixtures are built once; the heaviest files first, in tests/conftest.py's order);
# TEST_WORKERS=0 runs it in this process, e.g. to debug with pdb.
TEST_WORKERS ?= auto
TEST_DIST := --dist loadfile --no-loadscope-reorder

.PHONY: install demo test test-fast test-tools lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -e ".[dev,edge]"
	@touch $(STAMP)

# The main job, end to end: train on the embedded synthetic set, let `deploy` export every format and precision this
# CPU runs natively, verify and time each, and keep the fastest within the accuracy budget; then segment with it.
demo: $(STAMP)
	$(CLI) train --epochs $(DEMO_EPOCHS) --name demo
	$(CLI) deploy runs/demo/best.pt --out deployed
	$(CLI) predict deployed \
		"$$($(PY) -c 'from unet_edge.synth import default_data_dir; print(default_data_dir() / "val" / "images")')" \
		--limit 4 --out runs/demo-predict

test: $(STAMP) test-tools lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(TEST_DIST)

# The lint and type gate `make test` runs first: ruff (lint, and the format at 120 columns) and mypy.
lint: $(STAMP)
	$(PY) -m ruff check unet_edge cli benchmarks tests
	$(PY) -m ruff format --check --quiet unet_edge cli benchmarks tests
	$(PY) -m mypy

# The inner loop: everything not marked slow (no training runs, exports or benchmarks), a minute or two.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(TEST_DIST) -m "not slow"

# What the embedding and search tests need beside Python: Chromium, the C++ hosts' build tools and libraries, and a
# PostgreSQL server with a role and database PG_USER for the search test on a shared study (where apt-get and root
# allow), and the examples' npm packages (where npm is). Elsewhere those tests skip with the reason; under CI
# (CI=true) a failed install fails the run instead.
PG_USER := unet_edge
NPM_CI := npm ci --no-audit --no-fund --onnxruntime-node-install=skip
CPP_DEBS := g++ make cmake libpng-dev libssl-dev nlohmann-json3-dev
test-tools:
	@miss() { if [ "$${CI:-}" = true ]; then echo "error: $$1" >&2; exit 1; fi; echo "warning: $$1: the $$2 will skip"; }; \
	debs=$$(for deb in $(CPP_DEBS); do dpkg -s $$deb >/dev/null 2>&1 || echo $$deb; done); \
	if [ -n "$$debs" ]; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$debs >/dev/null; } \
	            || miss "could not install $$(echo $$debs)" "C++ host tests"; \
	    else miss "no apt-get as root to install $$(echo $$debs)" "C++ host tests"; fi; \
	fi; \
	if ! command -v chromium >/dev/null; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	            || miss "could not install chromium" "browser test"; \
	    else miss "no apt-get as root to install chromium" "browser test"; fi; \
	fi; \
	if ! command -v pg_ctlcluster >/dev/null; then \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; } \
	            || miss "could not install postgresql" "PostgreSQL search test"; \
	    else miss "no apt-get as root to install postgresql" "PostgreSQL search test"; fi; \
	fi; \
	if command -v pg_ctlcluster >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    { cluster=$$(pg_lsclusters -h | head -1 | awk '{print $$1" "$$2}'); \
	      [ -n "$$cluster" ] && { pg_ctlcluster $$cluster status >/dev/null || pg_ctlcluster $$cluster start; } \
	      && su postgres -c "psql -qtc \"SELECT 1 FROM pg_roles WHERE rolname='$(PG_USER)'\" | grep -q 1 \
	          || psql -qc \"CREATE ROLE $(PG_USER) LOGIN PASSWORD '$(PG_USER)'\"" >/dev/null \
	      && su postgres -c "psql -qtc \"SELECT 1 FROM pg_database WHERE datname='$(PG_USER)'\" | grep -q 1 \
	          || createdb -O $(PG_USER) $(PG_USER)" >/dev/null; } \
	        || miss "could not start PostgreSQL or create its $(PG_USER) role and database" "PostgreSQL search test"; \
	elif command -v pg_ctlcluster >/dev/null; then miss "PostgreSQL needs root to start here" "PostgreSQL search test"; fi; \
	if command -v npm >/dev/null; then \
	    for app in node web; do \
	        lock=examples/$$app/package-lock.json; done_=examples/$$app/node_modules/.package-lock.json; \
	        if [ ! -f $$done_ ] || [ $$lock -nt $$done_ ]; then \
	            (cd examples/$$app && $(NPM_CI) >/dev/null) || miss "npm ci failed in examples/$$app" "$$app example test"; \
	        fi; \
	    done; \
	else miss "npm not found" "Node.js and browser tests"; fi

clean:
	rm -rf runs deployed exported/*/ .pytest_cache
