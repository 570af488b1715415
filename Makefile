# edgetl developer and pipeline entry points. `make` alone lists the targets.
#
# `make demo` and `make test` install what they need first (a virtualenv in $(VENV)); a second call
# with an unchanged pyproject.toml installs nothing.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgetl-installed
# The CUDA build of torch that pip takes from this disk on Python 3.11 (runs on CPU too).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip --disable-pip-version-check
# ImageNet backbone for offline use, when the shared data sits beside the repository.
SHARED_WEIGHTS := $(wildcard ../shared/weights/mobilenet_v2_imagenet_features.pth)
export EDGETL_WEIGHTS ?= $(SHARED_WEIGHTS)

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint bench clean distclean model system-tools

# The firmware pipeline: `make model DATA=path/to/images TARGET=rpi4-cpu` (see edgetl/edgetl.mk).
EDGETL = $(BIN)/edgetl
EDGETL_DEPS = $(STAMP)
include edgetl/edgetl.mk
model: ## Fine-tune, export, check and package DATA for TARGET into build/TARGET/

help: ## Show this list
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create $(VENV) with edgetl and everything a developer needs

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -qq $(TORCH_PINS)
	$(PIP) install -qq -e '.[train,export,mcu,dev]'
	@touch $@

demo: $(STAMP) ## Install if needed, then run the embedded demo (a few minutes on a CPU)
	$(BIN)/edgetl demo

test: $(STAMP) system-tools ## Install if needed, then run the test suite
	$(BIN)/python -m pytest -q

# Debian packages some tests need, installed where that is possible without asking (root with apt-get):
# Chromium for the report's browser test, qemu-user-static + debootstrap for the emulated Raspberry Pi
# (edgetl check --on-target, package), openssh-server for the board-over-ssh test. Elsewhere those tests
# skip with a reason.
SYSTEM_TOOLS := chromium:chromium qemu-aarch64-static:qemu-user-static debootstrap:debootstrap sshd:openssh-server
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || [ -x /usr/sbin/$${pair%%:*} ] || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	   { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
	     apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1; }) || \
	  echo "note: could not install$$missing; the tests that need them will skip"; }

test-fast: $(STAMP) ## Tests without the slow end-to-end ones
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) ## Static checks
	$(BIN)/ruff check edgetl tests benchmarks

bench: $(STAMP) ## Training throughput benchmark (writes benchmarks/results/)
	$(BIN)/python benchmarks/train_throughput.py

clean: ## Remove caches, demo output and build/ (keeps $(VENV))
	rm -rf runs build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## Also remove $(VENV)
	rm -rf $(VENV)
