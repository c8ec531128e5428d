# One command sets everything up and runs the job; see README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

## The main job: the offline default demo (reward model + PPO on the built-in task).
demo: $(STAMP)
	$(VENV)/bin/jaxrlhf demo

## The whole test suite (unit tests, model/HF parity, trainers, executed notebooks).
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_rollout.py
	$(PY) benchmarks/bench_ppo.py
	$(PY) benchmarks/bench_grpo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxrlhf tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
