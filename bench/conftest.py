"""Setup of the pytest-benchmark suite (bench/test_microbench.py).

- Without CUDA, TRITON_INTERPRET=1 must be set before anything imports triton (as
  tests/conftest.py does), so that impl="triton" runs through the interpreter.
- pytest puts the repo root on sys.path to import this package; the suite takes it off
  again before each test runs, so that the top-level kernels/ folder cannot shadow
  Hugging Face's `kernels` package when transformers (via TRL) looks for it. fastrl's
  kernels are `fastrl.kernels`; the bench modules stay imported (sys.modules).
- `--micro-rounds` / `--micro-budget`: how many timed rounds benchmark.pedantic runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastrl microbenchmarks")
    group.addoption(
        "--micro-rounds",
        type=int,
        default=None,
        help="timed rounds per benchmark (default: as many as fit in --micro-budget, 3-20)",
    )
    group.addoption(
        "--micro-budget",
        type=float,
        default=None,
        help="seconds of timed rounds per benchmark (default: 1 on CUDA, 0.5 on a CPU)",
    )


def _is_repo_root(entry: str) -> bool:
    # "" is the working directory (python -c, an interactive shell)
    try:
        return Path(entry or os.getcwd()).resolve() == REPO_ROOT
    except OSError:
        return False


_STRIP_ROOT = False


def pytest_collection_finish(session: pytest.Session) -> None:
    # Not when tests/ runs in the same session: its tests import `tests.*` as they go.
    global _STRIP_ROOT
    bench_dir = Path(__file__).resolve().parent
    _STRIP_ROOT = all(Path(str(i.path)).resolve().is_relative_to(bench_dir) for i in session.items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    # after the setup, which imports bench/__init__.py and so puts the root back, and
    # before the test, whose baselines import transformers
    result = yield
    if _STRIP_ROOT:
        sys.path[:] = [p for p in sys.path if not _is_repo_root(p)]
    return result
