"""Test setup: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before anything imports triton, so it happens here, at
collection time, ahead of every `import fastrl`.
"""

import os

import pytest
import torch

# before the helpers are first imported: a failing check there reports its values
pytest.register_assert_rewrite("tests.support")

from tests.support import HAS_CUDA  # noqa: E402

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nan_empty(monkeypatch):
    """Make `torch.empty` (and `empty_like`) return NaN-filled float tensors.

    The Triton interpreter reads host memory on out-of-bounds loads without complaint,
    and a kernel that forgets to write an element leaves garbage that may look right.
    Poisoning fresh buffers with NaN makes both show up in the comparison.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
