"""tools/gpu_check.sh cannot rot before a GPU is available: its dry run (every stage on the
CPU, Triton interpreted, tiny shapes) runs here and writes the files a GPU run writes.

The dry run is packed as on the device tool (whose $OUT brings back at most 8 files) and
runs memcheck under a stand-in compute-sanitizer, so both of those paths are exercised.
"""

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STAGES = [
    "env", "smoke", "numerics", "padding", "logprobs", "policy", "gpu_tests", "gae",
    "preference", "memcheck", "report",
]  # fmt: skip
# stages whose own check may fail on the library under test: they must still have run
CHECKS = {"smoke", "numerics", "gpu_tests"}

# stands in for compute-sanitizer: checks the options the driver passes, writes the log
# a clean memcheck writes, and asks the program for --help (its arguments must parse; the
# plain smoke stage has already run it, ~15 s more in the interpreter)
FAKE_SANITIZER = """#!/usr/bin/env bash
log=""
while [[ $1 == --* ]]; do
    case $1 in
        --tool) [[ $2 == memcheck ]] || exit 9; shift 2 ;;
        --log-file) log=$2; shift 2 ;;
        --error-exitcode|--print-limit|--target-processes) shift 2 ;;
        *) exit 9 ;;
    esac
done
[[ -n $log ]] || exit 9
"$@" --help >/dev/null
rc=$?
echo "========= ERROR SUMMARY: 0 errors" > "$log"
exit $rc
"""


def _plan():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_plan
    finally:
        sys.path.pop(0)
    return gpu_plan


def test_plan_resolves_in_the_benchmarks():
    """Every method, shape and variant flag of the GPU run exists in the benchmarks (the dry
    run times only fastrl and eager)."""
    plan = _plan()
    assert plan.check() == []
    logprobs = plan.BENCHES["logprobs"].args(dry_run=False)
    assert "--quick" in logprobs
    assert "--variant=tiles:FASTRL_LOGPROBS_DESIGN=tiles" in logprobs
    shapes = logprobs[logprobs.index("--shapes") + 1].split(",")
    assert len(shapes) == 9 and shapes[0] == "16384x4096x128256"


def test_usage_and_bad_options():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--dry-run" in done.stdout
    done = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2


@pytest.mark.slow
def test_dry_run(tmp_path):
    """One packed dry run (~80 s on 2 CPU cores; a single test, so that pytest-xdist never
    runs it twice), then every check of what it wrote."""
    out, tree, stdout = _dry_run(tmp_path)
    _check_stages(tree, stdout)
    _check_files(tree)
    _check_variants(tree)
    _check_pack(out)


def _dry_run(tmp: Path) -> tuple[Path, Path, str]:
    """(the folder the device tool would bring back, the tree, stdout)."""
    out, tree = tmp / "out", tmp / "tree"
    fake = tmp / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env.update(COMPUTE_SANITIZER=str(fake), PY=sys.executable)
    # a budget with room: on CI's 2 cores this runs beside another test worker
    cmd = ["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--pack", "--tree", str(tree),
           "--budget", "540"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, tree, done.stdout


def _check_stages(tree: Path, stdout: str) -> None:
    summary = json.loads((tree / "summary.json").read_text())
    assert summary["mode"] == "dry-run"
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert list(status) == STAGES, status
    bad = {
        name: (s, next(x["reason"] for x in summary["stages"] if x["name"] == name))
        for name, s in status.items()
        if s != "ok" and not (name in CHECKS and s == "fail")
    }
    assert not bad, bad
    assert summary["elapsed_s"] < summary["budget_s"]
    for name in STAGES:
        assert (tree / "logs" / f"{name}.log").exists(), name
    assert "results ready for bench/results/" in stdout  # the report's headline is printed


def _check_files(tree: Path) -> None:
    env = json.loads((tree / "env.json").read_text())
    stem = env["stem"]
    assert stem.endswith(env["date"]) and "-cpu-" in stem  # bench/results ignores *-cpu-*
    assert {"precision", "nvidia_smi", "tools", "source", "torch", "triton"} <= set(env)
    results = tree / "results"
    for prefix in ("", "policy-", "preference-", "padding-"):
        assert (results / f"{prefix}{stem}.json").exists(), prefix
        assert (results / f"{prefix}{stem}.png").stat().st_size > 1000, prefix
    assert (results / f"numerics-{stem}.json").exists()
    gae = json.loads((results / f"gae-{stem}.json").read_text())
    (case,) = gae["rows"]  # the CPU shape: each tile checked against the PyTorch path, timed
    assert all(m["status"] == "ok" and m["ms"] > 0 for m in case["methods"].values()), case
    assert {"copy", "torch"} < set(case["methods"]) and "of_copy" in case["methods"]["torch"]
    assert (results / f"gae-{stem}.png").stat().st_size > 1000

    smoke = json.loads((tree / "smoke.json").read_text())
    assert len(smoke["calls"]) >= 20
    assert {c["variant"] for c in smoke["calls"]} >= {v.name for v in _plan().VARIANTS}
    numerics = json.loads((results / f"numerics-{stem}.json").read_text())
    assert {r["dtype"] for r in numerics["rows"]} == {"float32", "float16"}
    assert all("kl" in r or "error" in r for r in numerics["rows"])
    padding = json.loads((results / f"padding-{stem}.json").read_text())
    ratios = {(r["op"], r["mode"]): r["ratio"] for r in padding["rows"]}
    assert set(ratios) >= {("linear_logprobs", "fwdbwd"), ("fused_policy_loss", "fwdbwd")}
    # each ratio measured (a number, positive); its size is the benchmark's to judge: a
    # dry run's tiny shapes on a loaded CPU time nothing but noise
    assert all(isinstance(r, float) and 0 < r < float("inf") for r in ratios.values())
    ET.parse(tree / "gpu_tests.xml")  # junit written (every gpu test skipped on a CPU)
    assert "ERROR SUMMARY: 0 errors" in (tree / "memcheck.log").read_text()


def _check_variants(tree: Path) -> None:
    """Each benchmark timed fastrl and right after it every variant the plan gives it."""
    plan = _plan()
    stem = json.loads((tree / "env.json").read_text())["stem"]
    for bench in plan.BENCHES.values():
        data = json.loads((tree / "results" / f"{bench.prefix}{stem}.json").read_text())
        variants = [v for v in plan.VARIANTS if bench.name in v.benches]
        assert set(data["config"]["variants"]) == {v.name for v in variants}
        (case,) = data["cases"]
        assert case["matmul"]["status"] == "ok"
        methods = case["methods"]
        assert list(methods)[: len(variants) + 1] == ["fastrl"] + [
            f"fastrl:{v.name}" for v in variants
        ]
        assert methods["eager"]["status"] == "ok"
        assert methods["fastrl"]["status"] == "ok", methods["fastrl"].get("reason")
        for v in variants:
            m = methods[f"fastrl:{v.name}"]
            assert m["env"] == v.env
            # a design fastrl rejects is recorded, and the run goes on
            assert m["status"] == "ok" or m["reason"], m
            if m["status"] == "ok":
                assert m["ms"]["fwdbwd"] > 0


def _check_pack(out: Path) -> None:
    """What the device tool would bring back: four files, the tree in the tarball."""
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "gpu_check.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./summary.json", "./env.json", "./smoke.json", "./gpu_tests.xml"} <= names
    assert sum(n.startswith("./results/") and n.endswith(".png") for n in names) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]][-1] == "report"


@pytest.mark.slow
def test_step_stages_run_only_when_named(tmp_path):
    """The opt-in grpo_step and ppo_step stages (issues 12 and 14: GPU figures that need a
    command of their own): their dry run times fastrl, TRL and patched TRL's GRPO step and
    fastrl's PPO step on a tiny model, and the report shows them."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env.update(PY=sys.executable, TMPDIR=str(tmp_path))
    cmd = ["bash", str(SCRIPT), "--dry-run", "--stages", "grpo_step,ppo_step", "--out",
           str(tmp_path / "t")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["env", "grpo_step", "ppo_step", "report"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    (path,) = (tmp_path / "t" / "results").glob("grpo_step-*.json")
    rows = json.loads(path.read_text())["results"]
    assert [r["trainer"] for r in rows] == ["fastrl", "trl", "trl-patched"]
    assert all(r.get("tokens_per_second", 0) > 0 for r in rows), rows
    assert path.with_suffix(".png").stat().st_size > 1000
    assert "tiny fastrl: " in done.stdout and "speed_vs_trl" in done.stdout
    (path,) = (tmp_path / "t" / "results").glob("ppo_step-*.json")
    (row,) = json.loads(path.read_text())["results"]  # no verl in this python
    assert row["trainer"] == "fastrl" and row["tokens_per_second"] > 0, row
    report = done.stdout[done.stdout.index("ppo_step (") :]
    assert "  tiny fastrl: " in report and " s/step (" in report
