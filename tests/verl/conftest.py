"""Tests of `patch_verl` against verl's own code, collected only where verl is installed:
`make test-verl` runs them in `.venv-verl` (verl 0.9.1 pins a transformers the dev venv
cannot share; the vLLM venv has no verl either).

The model: the tiny untied float32 Qwen2 of `tests.support.engine` (hidden 64, not a
multiple of 128: verl's Triton kernel would refuse it, fastrl does not care)."""

import importlib.util

if importlib.util.find_spec("verl") is None:
    collect_ignore_glob = ["test_*.py"]  # the dev and vLLM venvs: `make test-verl` runs these
