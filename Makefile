# fastrl: make venv | demo | test | bench | bench-policy | bench-preference | bench-grpo-step | lint
#
# Everything runs from .venv. On a machine without CUDA (no nvidia-smi) pip is held to
# constraints-cpu.txt so it installs the CPU torch wheel, never the multi-GB CUDA one.

PYTHON3   ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.stamp
EXTRAS    ?= dev,bench
HAS_CUDA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
PIP_FLAGS ?=
CONSTRAIN := $(if $(HAS_CUDA),,-c constraints-cpu.txt)
PYTEST_N  ?= 2
BENCH_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv demo test bench bench-policy bench-preference bench-grpo-step lint format clean-venv help

help:
	@echo "make venv    create $(VENV) and install fastrl[$(EXTRAS)] (editable)"
	@echo "make demo    the main job: SFT warm-up, GRPO + LoRA, DPO on a tiny model (DEMO_ARGS)"
	@echo "make test    run the test suite (pytest -n $(PYTEST_N))"
	@echo "make bench   benchmark linear_logprobs (GPU shapes on CUDA, tiny ones on CPU);"
	@echo "             extra options via BENCH_ARGS='--head both --shapes gpu-quick'"
	@echo "make bench-policy  benchmark fused_policy_loss against TRL, Liger and eager;"
	@echo "             extra options via BENCH_ARGS='--loss-type dapo,grpo --beta 0.04'"
	@echo "make bench-preference  benchmark fused_preference_loss against TRL, Liger, eager;"
	@echo "             extra options via BENCH_ARGS='--loss-type sigmoid,ipo --beta 0.1'"
	@echo "make bench-grpo-step  one GRPO LoRA training step, fastrl vs TRL's GRPOTrainer"
	@echo "             (Qwen2.5-1.5B and 7B-4bit shapes, 24 GiB cap; GPU; needs bitsandbytes)"
	@echo "make lint    ruff check + ruff format --check"

venv: $(STAMP)

# Re-runs only when pyproject.toml or the CPU constraints change (or the venv is gone).
$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(PIP_FLAGS) $(CONSTRAIN) -e ".[$(EXTRAS)]"
	@touch $@

test: venv
	$(PY) -m pytest -q $(if $(filter-out 0 1,$(PYTEST_N)),-n $(PYTEST_N)) tests

demo: venv
	$(VENV)/bin/fastrl demo $(DEMO_ARGS)

bench: venv
	$(PY) bench/bench_logprobs.py $(BENCH_ARGS)

bench-policy: venv
	$(PY) bench/bench_policy.py $(BENCH_ARGS)

bench-preference: venv
	$(PY) bench/bench_preference.py $(BENCH_ARGS)

bench-grpo-step: venv
	$(PY) bench/bench_grpo_step.py $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
