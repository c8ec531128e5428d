# One command sets everything up and runs the job; see README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUM    := $(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.installed-demo-$(SUM)
TEST_STAMP := $(VENV)/.installed-test-$(SUM)

.PHONY: setup demo test bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# The demo needs the package alone (jax, flax, optax, transformers, ...): no torch, no test tools.
$(DEMO_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	@touch $@

# The tests also need the test extras (torch for the HF parity tests, pytest, ...) and, for the
# browser test of `jaxrlhf collect`, Debian's headless Chromium and its driver.
$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	bash .ci/install-browser.sh $(VENV)
	@touch $@ $(DEMO_STAMP)

setup: $(TEST_STAMP)

## The main job: the offline default demo (reward model + PPO on the built-in task).
demo: $(DEMO_STAMP)
	$(VENV)/bin/jaxrlhf demo

## The whole test suite (unit tests, model/HF parity, trainers, executed notebooks).
test: $(TEST_STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(TEST_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_rollout.py
	$(PY) benchmarks/bench_ppo.py
	$(PY) benchmarks/bench_grpo.py

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
