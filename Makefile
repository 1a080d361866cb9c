# One-command install and test. `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The torch build this project is tested with; the ranges in pyproject.toml
# also admit the GPU image's torch 2.11.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install lint format test test-fast system-tools bench bench-quality bench-method gpu-check demo clean openapi cli-docs

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[all,examples]'
	@touch $@

# Tests talk to a real redis-server, make a Redis Cluster with redis-cli
# (--cluster create), and validate the compose files with Debian's
# docker-compose: install them when we can (root on Debian).
SYSTEM_TOOLS := redis-server:redis-server redis-cli:redis-tools docker-compose:docker-compose
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  else \
	    echo "missing system packages:$$missing (and this is not a root Debian shell)."; \
	    echo "Install them (Debian/Ubuntu: sudo apt-get install -y$$missing; macOS: brew install redis docker-compose) and run make test again."; \
	    exit 1; \
	  fi; fi

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

openapi: install
	$(PY) -m clsp_positives.proto.openapi --write

# docs/cli.md's option tables, from the pydantic models (tests/test_config_docs.py checks them)
cli-docs: install
	$(PY) -m clsp_positives.config_docs --write

test: install system-tools lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install system-tools
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info

# Images and the local stack without Docker Hub (docs/deployment.md). Needs
# root, Docker's dockerd and client (started and stopped here when no engine
# runs), and the host's python3; not the project's venv.
.PHONY: image-certs image-base compose-check
DEBIAN_BASE_IMAGE ?= clsp-positives-debian:bookworm
IMAGE_CERTS := deploy/docker/certs

# The host's CA bundle, when pip is pointed at one: behind a TLS-inspecting
# proxy the image build's pip needs the proxy's authority too.
image-certs:
	@rm -f $(IMAGE_CERTS)/*.crt
	@bundle="$${PIP_CERT:-$${REQUESTS_CA_BUNDLE:-$${SSL_CERT_FILE:-}}}"; \
	if [ -n "$$bundle" ] && [ -f "$$bundle" ]; then \
	  echo "the image build trusts $$bundle"; cp "$$bundle" $(IMAGE_CERTS)/host.crt; fi

# A minimal Debian image built here: debootstrap + docker import.
image-base: image-certs
	DEBIAN_BASE_IMAGE=$(DEBIAN_BASE_IMAGE) deploy/docker/with-dockerd.sh deploy/docker/debian-base.sh

# The local stack end to end on the CPU: build, train a tiny DDPM, serve,
# scale, train one epoch, check, tear down (deploy/compose/check.py).
COMPOSE_CHECK_ARGS ?=
compose-check: image-base system-tools
	DEBIAN_BASE_IMAGE=$(DEBIAN_BASE_IMAGE) TORCH_SPEC="$(TORCH_SPEC)" \
	  deploy/docker/with-dockerd.sh python3 deploy/compose/check.py $(COMPOSE_CHECK_ARGS)

# The whole loop on this machine (CPU is fine): DDPM, service, positives, baseline vs CLSP.
# DEMO_ARGS=--quick for the short run.
DEMO_ARGS ?=
demo: install
	$(PY) -m clsp_positives.cli demo $(DEMO_ARGS)

# The lent CUDA machine has torch and triton but no venv: it runs the check
# with its own python3 (the wheels of missing pure-Python packages travel in .whl/).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tests/bench/gpu_check.py --out $${OUT:-gpu-check-out}

# Benchmarks: ratios against a baseline in the same run (docs/performance.md).
# The trained digits DDPM that the quality benchmarks share (about 10 CPU minutes).
BENCH_MODEL ?= runs/ddpm-digits
$(BENCH_MODEL)/unet/config.json: | install
	$(PY) tests/bench/quality.py --model-dir $(BENCH_MODEL) --out runs/quality.json

bench: install system-tools $(BENCH_MODEL)/unet/config.json
	$(PY) tests/bench/generation.py --batches 1,8,64 --steps 3 --threads 1 --compile
	$(PY) tests/bench/service.py
	$(PY) tests/bench/trainer.py
	$(PY) tests/bench/slow_pool.py --epochs 3 --gen-steps 30 --backbone resnet18 --json runs/slow-pool.json
	$(PY) tests/bench/load.py --seconds 60 --clients 32
	$(PY) tests/bench/speed_quality.py --model $(BENCH_MODEL) --out runs/speed-quality

# Ten CPU minutes of DDPM training, then the class-kept rate of the positives.
bench-quality: install
	$(PY) tests/bench/quality.py --out runs/quality.json

# Baseline against the CLSP, oracle and w = 0 arms over 5 seeds at equal budget, with
# paired confidence intervals (docs/method.md); ~30 min of the whole machine.
# BENCH_METHOD_ARGS="--dataset digits-photos --write-docs", "--reuse", ...
BENCH_METHOD_ARGS ?=
bench-method: install system-tools
	$(PY) tests/bench/method.py $(BENCH_METHOD_ARGS)
