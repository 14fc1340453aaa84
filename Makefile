# adpredict — every target sets up what it needs; `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adpredict-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

DEMO_ROWS ?= 500000
DEMO_DATA ?= data/demo
MODELS ?= models
DEMO_MODEL ?= $(MODELS)/demo
PORT ?= 50051
METRICS_PORT ?= 9090

.PHONY: help venv native-deps prometheus-tools run demo-model serve test lint format proto bench clean

help:
	@echo "make run    - set up, train the demo model if $(MODELS)/ has none, serve it on localhost:$(PORT)"
	@echo "make test   - set up, lint, run the test suite"
	@echo "make bench  - run the benchmarks (a few minutes)"
	@echo "make proto  - regenerate gRPC code from proto/"
	@echo "make lint / format / clean"

# The virtualenv is rebuilt only when the package definition or a native extension changes.
# The native intake (src/adpredict/serving/_intake.cpp, `serve --frontend native`) is built when
# grpc++ is there (native-deps installs Debian's); without it the package installs without it.
# The codec's value scan (src/adpredict/serving/_scan.c) needs only a C compiler; its wire
# decoder (_wire.c) also numpy's headers, so numpy is installed before the package is built.
$(STAMP): pyproject.toml setup.py $(wildcard src/adpredict/serving/_*.c src/adpredict/serving/_*.h src/adpredict/serving/_*.cpp) | native-deps
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "adpredict needs Python >= 3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools 'pybind11>=2.10' 'numpy>=1.26,<3'
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# grpc++ headers and libraries for the native intake (Debian's packages; needs root or sudo).
native-deps:
	@if ! pkg-config --exists grpc++ 2>/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "cannot install grpc++ (not root, no sudo): building without the native intake"; exit 0; fi; \
		echo "installing Debian's grpc++ (for the native intake)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends libgrpc++-dev pkg-config g++ >/dev/null; \
	fi

# promtool and a Prometheus server for the metrics and alert-rule tests (Debian's package).
prometheus-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "cannot install prometheus (not root, no sudo): its tests will be skipped"; exit 0; fi; \
		echo "installing Debian's prometheus package (promtool + server, for tests)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi

# Train the demo model only if the model repository has no version of it yet.
demo-model: $(STAMP)
	@if ls -d $(DEMO_MODEL)/[0-9]* >/dev/null 2>&1; then \
		echo "demo model present: $$(ls -d $(DEMO_MODEL)/[0-9]* | sort -V | tail -1)"; \
	else \
		test -f $(DEMO_DATA)/manifest.json || $(VENV)/bin/adpredict synth --rows $(DEMO_ROWS) --out $(DEMO_DATA) --seed 1; \
		$(VENV)/bin/adpredict train --data $(DEMO_DATA) --model-dir $(DEMO_MODEL); \
	fi

run: demo-model
	@echo "Serving on localhost:$(PORT). In another terminal:"
	@echo "  $(VENV)/bin/adpredict predict --target localhost:$(PORT) --example"
	$(VENV)/bin/adpredict serve --model-dir $(MODELS) --host 127.0.0.1 --port $(PORT) --metrics-port $(METRICS_PORT)

test: $(STAMP) prometheus-tools
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src --grpc_python_out=src proto/adpredict/v1/prediction_service.proto

# Short runs of every benchmark (a few minutes in all; *.quick.* results never overwrite the full
# ones). Full runs and their commands: docs/BENCHMARKS.md.
bench: demo-model
	$(PY) benchmarks/bench_decode.py
	$(PY) benchmarks/bench_optimizers.py --quick
	$(PY) benchmarks/bench_model.py --model-dir $(MODELS) --quick
	$(PY) benchmarks/bench_batching.py --model-dir $(MODELS) --quick
	$(PY) benchmarks/bench_frontends.py --model-dir $(MODELS) --quick
	$(PY) benchmarks/bench_overload.py --model-dir $(MODELS) --quick
	$(PY) benchmarks/bench_soak.py --model-dir $(MODELS) --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info src/*.egg-info
