"""bench/bench_ppo_step.py on CPU with the tiny model: fastrl's PPO step runs in its own
process and writes a row; OpenRLHF / verl rows say they are not installed (GPU figures come
from GPU runs only)."""

import importlib.util
import json
import sys

import pytest

pytest.importorskip("peft")

from bench.bench_ppo_step import main, peer_status  # noqa: E402


def test_peer_status_names_what_is_missing():
    assert peer_status("fastrl") is None
    if importlib.util.find_spec("openrlhf") is None:
        assert peer_status("openrlhf") == "not installed"


def test_one_ppo_step_is_measured(tmp_path):
    out = tmp_path / "ppo_step.json"
    main(["--models", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
          "--rollout-size", "2", "--prompt-length", "4", "--completion-length", "4",
          "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
          # this python: the verl row (tests/verl runs it) is not run from the dev venv
          "--verl-python", sys.executable])  # fmt: skip
    rows = {r["trainer"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"fastrl", "openrlhf", "verl"}
    fastrl = rows["fastrl"]
    assert "error" not in fastrl, fastrl.get("stderr_tail")
    assert len(fastrl["steps"]) == 2 and fastrl["tokens_per_second"] > 0
    assert 0 < fastrl["generate_seconds_per_step"] < fastrl["seconds_per_step"]
    assert "loss/value_avg" in fastrl["last_log"]
    assert rows["openrlhf"]["error"] == peer_status("openrlhf")
    assert rows["verl"]["error"] == peer_status("verl", sys.executable)
