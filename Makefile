# `make demo` and `make test` each create .venv when absent and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Quiet TensorFlow's C++ logging; JAX stays on CPU unless an accelerator is present.
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo demo-reward test test-slow install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(VENV)/.runtime: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

# The web app's packages (requirements-app.txt: why --no-deps), kept out of the training requirements.
$(VENV)/.app: requirements-app.txt $(VENV)/.runtime
	$(PY) -m pip install --no-deps -r requirements-app.txt
	touch $@

install: $(VENV)/.dev $(VENV)/.app

demo: $(VENV)/.runtime $(VENV)/.app
	$(PY) -m smfsr_jax.demo --workdir workdirs/demo

# Stage 3 in miniature on the demo's stage-2 student (trains stages 0-2 first when `make demo` has not): ~5 min
# on 2 cores, kept out of `make demo` so that it stays well inside its 15 minutes.
demo-reward: $(VENV)/.runtime
	$(PY) benchmarks/reward_tiny.py --workdir workdirs/demo

# Two workers, each test file on one of them (module fixtures are built once).
test: $(VENV)/.dev $(VENV)/.app
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Slow tests (full-size shape checks that need more memory or minutes); not part of `make test`.
test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) workdirs
