# Two commands: `make demo` and `make test` (and its tiers below). Both create .venv and install what they need.
# torch is installed first and on its own: TORCH_SPEC defaults to the 2.13.0 release (a CPU wheel is cached on the
# project's dev/CI machines); on your machine pass the build you want, e.g. `make test TORCH_SPEC=torch`, or keep an
# existing torch by creating .venv yourself with --system-site-packages.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast test-torchrun test-openenv bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/r1lab demo

test: setup
	$(PY) -m pytest tests

# The tiers, by pytest marker (pyproject.toml): `make test` runs every test (CI runs it: .ci/run).
# `make test-fast` (at most 90 s on an idle 2-core CPU) leaves out the tests marked slow (end-to-end runs of whole
# commands, the server and chat page commands, the sandbox's 1,000 rewards, and whole training runs or long loops whose
# parts keep a unit test in the tier: GRPO resume and rollout slots, LoRA runs, run health, MoE balancing, Qwen3's
# cached decode, LiveBatch's penalties and moves, async GRPO's runs, timing-bound server and sandbox tests; see
# docs/testing.md), those marked torchrun (each starts 2-process jobs: about 56 s of the
# 125 s the fast tier took with them) but for the one also marked smoke (two ranks train to the weights of one
# process), and those marked gpu. It runs on one pytest-xdist worker per core (at most 4), each worker's torch
# threads its share of the cores (tests/conftest.py): most of a unit test's time is Python, one core's work. Each test
# file runs on one worker (--dist loadfile), the longest first (tests/conftest.py): a module's fixtures and the optional
# libraries its tests import are then paid once, not on every worker.
FAST := not slow and not gpu and (not torchrun or smoke)
FAST_WORKERS := -n auto --maxprocesses 4 --dist loadfile
test-fast: setup
	$(PY) -m pytest tests -m "$(FAST)" $(FAST_WORKERS)

# every torchrun job: 2 ranks on the CPUs train, resume, evaluate, sample, shard, and fail as they should
test-torchrun: setup
	$(PY) -m pytest tests -m torchrun

# OpenEnv environments (tests/test_openenv_env.py) in a venv of their own: openenv cannot be installed beside verifiers
# (verifiers pins mcp 2.0, openenv's fastmcp needs mcp < 2). torch as for .venv; the rest by uv, whose cache makes a
# rebuild take seconds where pip takes minutes (openenv brings gradio, fastmcp and their ~150 dependencies)
OPENENV_VENV := .venv-openenv
$(OPENENV_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OPENENV_VENV)
	$(OPENENV_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" uv
	$(OPENENV_VENV)/bin/python -m uv pip install -q --python $(OPENENV_VENV)/bin/python -e ".[openenv]" "pytest>=8"
	touch $@

test-openenv: $(OPENENV_VENV)/.installed
	$(OPENENV_VENV)/bin/python -m pytest tests/test_openenv_env.py

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/grpo_vs_trl.py

clean:
	rm -rf $(VENV) $(OPENENV_VENV) runs
