# vfl: vertical federated logistic regression. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# protoc finds the mypy-protobuf plugins on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install proto proto-check lint typecheck test test-compose test-system demo certs bench up down clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null || \
		{ echo "need Python 3.11 (python3.11 on PATH, or PYTHON=/path/to/python3.11)"; exit 1; }
	@# libsodium (Debian's libsodium23) carries the ristretto255 group of the PSI (pysodium loads it).
	@$(PYTHON) -c 'import ctypes.util, sys; sys.exit(ctypes.util.find_library("sodium") is None)' || \
		{ echo "installing libsodium23 (Debian) for the private set intersection"; \
		  $$( [ $$(id -u) -eq 0 ] || echo sudo ) sh -c 'apt-get update -qq && apt-get install -y -qq libsodium23' >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pinned dependencies

proto: $(STAMP) ## regenerate vfl/v1 from protos/
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. protos/vfl/v1/*.proto

proto-check: $(STAMP) ## fail if the generated code differs from protos/
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp protos/vfl/v1/*.proto && \
	diff -r -x __init__.py -x __pycache__ $$tmp/vfl/v1 vfl/v1 && echo "proto-check: generated code is up to date"; \
	rc=$$?; rm -rf $$tmp; exit $$rc

lint: $(STAMP) ## ruff, and the import contract (no gRPC under vfl/common/protocol, vfl/common/crypto)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

typecheck: $(STAMP) ## mypy, strict on all of vfl/ but the generated vfl/v1
	$(VENV)/bin/mypy vfl

# Debian's chromium renders the model report headless in tests/test_report.py
# (skipped without it, unless VFL_REQUIRE_CHROMIUM=1 as in .ci/run).
CHROMIUM_STAMP := $(VENV)/.chromium
$(CHROMIUM_STAMP): $(STAMP)
	@command -v chromium >/dev/null || \
		{ echo "installing chromium (Debian) for the report's rendering test"; \
		  $$( [ $$(id -u) -eq 0 ] || echo sudo ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium' >/dev/null; }
	touch $(CHROMIUM_STAMP)

test: $(STAMP) $(CHROMIUM_STAMP) ## unit, protocol, end-to-end and report tests (real gRPC, real OU and Paillier keys, headless Chromium)
	@# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
	@# tests/system (root, network namespaces) is make test-system's.
	@$(PY) -m pytest -q tests --ignore=tests/system; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; exit 1; fi; exit $$rc

demo: $(STAMP) ## local federation: train on the bundled breast data, predict the held-out 20 %, print the AUC
	$(VENV)/bin/vfl demo

certs: $(STAMP) ## CA + certificate and key for active, passive, assistant, client in ./certs (NAMES=a,b: more clients)
	$(VENV)/bin/vfl certs --out certs $(if $(NAMES),--names $(NAMES))

# make bench BENCH=primitives|breast|synthetic|sweep|load|soak|psi|parties|poly5|quality|scale runs one workload; BENCH_ARGS passes more options
# (e.g. BENCH_ARGS="--backends ou,phe" or "--quick"). soak (30 min through a faulty network; VFL_SOAK_MINUTES=M
# sets its length, --quick makes it about 1) is not part of BENCH=all.
BENCH ?= all
BENCH_ARGS ?=
bench: $(STAMP) ## benchmarks on the real federation (2048-bit keys) -> BENCHMARKS.md, benchmarks/results.json
	$(PY) -m benchmarks.bench --bench $(BENCH) $(BENCH_ARGS)

test-compose: ## docker-compose: build, run the demo federation (also with two passive parties, and on Ray), check the AUC
	bash tests/system/test_compose.sh
	COMPOSE_FILE=docker-compose.parties.yml SERVICES="b1 b2 active demo" bash tests/system/test_compose.sh
	COMPOSE_FILE=docker-compose.yml:docker-compose.ray.yml EXPECT_LOG="passive:event=ray_blocks blocks=64 nodes=2" RAY_ISOLATION=1 \
		bash tests/system/test_compose.sh

test-system: $(STAMP) ## system tests: network namespaces and netem (as root; skipped otherwise), fault-injecting proxies
	@# Skipped tests exit 0; collecting nothing (exit 5) is a failure.
	@$(PY) -m pytest -q -rs tests/system; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-system: pytest collected no tests"; exit 1; fi; exit $$rc

up: ## docker-compose up (demo federation)
	docker-compose up --build

down: ## docker-compose down
	docker-compose down -v

clean: ## remove the venv and local run state
	rm -rf $(VENV) .vfl run
