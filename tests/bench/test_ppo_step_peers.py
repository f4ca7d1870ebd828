"""bench/bench_ppo_step.py's peers: which interpreter runs the verl row (`--verl-python`,
else this python if it has verl, else the repo's `.venv-verl`), the "not installed" rows,
and the worker command. Interpreters are stand-in scripts: nothing here needs verl."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bench import bench_ppo_step as b


def _python(path: Path, has_verl: bool) -> str:
    """A stand-in interpreter: exits 0 (verl found) or 1 for the probe it is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nexit {0 if has_verl else 1}\n")
    path.chmod(0o755)
    return str(path)


def _verl_here(monkeypatch, spec) -> None:
    """`importlib.util.find_spec("verl")` answers `spec`; other names as they are."""
    find_spec = importlib.util.find_spec

    def find(name, *args):
        return spec if name == "verl" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find)


@pytest.fixture
def no_verl_here(monkeypatch, tmp_path):
    """This python without verl, and a repo root (tmp_path) without .venv-verl."""
    _verl_here(monkeypatch, None)
    monkeypatch.setattr(b, "_REPO", tmp_path)
    return tmp_path


def test_no_verl_anywhere_is_not_installed(no_verl_here):
    assert b.default_verl_python() is None
    assert b.peer_status("verl") == "not installed"


def test_the_repos_verl_venv_is_the_default(no_verl_here):
    venv = _python(no_verl_here / ".venv-verl" / "bin" / "python", has_verl=True)
    assert b.default_verl_python() == venv
    assert b.peer_status("verl") is None
    _python(Path(venv), has_verl=False)  # a venv whose verl is gone
    assert b.peer_status("verl") == f"not installed (in {venv})"


def test_verl_python_overrides_the_default(no_verl_here, tmp_path):
    _python(no_verl_here / ".venv-verl" / "bin" / "python", has_verl=True)
    other = _python(tmp_path / "other" / "python", has_verl=False)
    assert b.peer_status("verl", other) == f"not installed (in {other})"
    missing = str(tmp_path / "nowhere" / "python")
    assert b.peer_status("verl", missing) == f"not installed (in {missing})"


def test_this_python_when_it_has_verl(monkeypatch, tmp_path):
    _verl_here(monkeypatch, importlib.util.spec_from_loader("verl", loader=None))
    monkeypatch.setattr(b, "_REPO", tmp_path)
    assert b.default_verl_python() == sys.executable
    assert b.peer_status("verl") is None


def test_openrlhf_and_fastrl_rows():
    assert b.peer_status("fastrl") is None
    if importlib.util.find_spec("openrlhf") is None:
        assert b.peer_status("openrlhf") == "not installed"
    else:
        assert "flash_attn" in b.peer_status("openrlhf")


def test_the_verl_worker_runs_in_the_verl_python(tmp_path):
    opts = Namespace(steps=1, warmup=1, kl_coef=0.05, max_memory_gb=0.0, rollout_size=2,
                     prompt_length=4, completion_length=3, cache_dir=str(tmp_path),
                     attn_implementation="sdpa", verl_python="/opt/verl/bin/python")  # fmt: skip
    cmd = b._worker_command(opts, "tiny", "verl")
    assert cmd[:2] == ["/opt/verl/bin/python", b.__file__]
    assert cmd[cmd.index("--trainer") + 1] == "verl" and cmd[cmd.index("--models") + 1] == "tiny"
    assert cmd[cmd.index("--completion-length") + 1] == "3"
    assert b._worker_command(opts, "tiny")[0] == sys.executable  # the fastrl row: this python


def test_a_trainer_without_a_runner_is_refused():
    with pytest.raises(ValueError, match="'openrlhf' has no runner"):
        b.run_one(Namespace(trainer="openrlhf"))
