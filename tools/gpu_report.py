"""tools/gpu_check.sh's bookkeeping: the stage records of summary.json, and the closing
report (the headline figures of every stage -> summary.md, printed; missing plots drawn).

    python tools/gpu_report.py init TREE/summary.json --mode gpu --budget 470 [key=value ...]
    python tools/gpu_report.py record TREE/summary.json NAME STATUS SECONDS RC LIMIT EST LOG REASON
    python tools/gpu_report.py report TREE

Standard library only, except that `report` draws a benchmark's PNG with bench/plot.py
(matplotlib) when a stage stopped before drawing it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


def init(path: Path, mode: str, budget: str, extra: list[str]) -> None:
    data = {
        "tool": "tools/gpu_check.sh",
        "mode": mode,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "budget_s": float(budget),
        **dict(kv.split("=", 1) for kv in extra),
        "stages": [],
    }
    _write(path, data)


def record(path: Path, name: str, status: str, seconds: str, rc: str, limit: str, est: str,
           log: str, reason: str) -> None:  # fmt: skip
    data = _load(path) or {"stages": []}
    stage = {
        "name": name,
        "status": status,
        "seconds": round(float(seconds), 1),
        "rc": None if rc == "" else int(rc),
        "timeout_s": None if limit == "" else float(limit),
        "est_gpu_s": None if est == "" else float(est),
        "log": log or None,
        "reason": reason or None,
    }
    data["stages"] = [s for s in data["stages"] if s["name"] != name] + [stage]
    started = _dt.datetime.fromisoformat(data.get("started", stage_time_now()))
    data["elapsed_s"] = round((_dt.datetime.now() - started).total_seconds(), 1)
    _write(path, data)


def stage_time_now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def bench_lines(data: dict) -> list[str]:
    """One line per case: the cuBLAS floor, then every method's fwdbwd time (x floor, and
    workspace or peak memory where measured)."""
    lines = []
    for case in data.get("cases", []):
        mm = case.get("matmul", {})
        floor = mm.get("ms", {}).get("fwdbwd") if mm.get("status") == "ok" else None
        parts = [f"mm {_fmt(floor)}"]
        for name, m in case.get("methods", {}).items():
            if m.get("status") != "ok":
                parts.append(f"{name} {m.get('status')}")
                continue
            ms = m.get("ms", {})
            t = ms.get("fwdbwd", next(iter(ms.values()), None))
            text = f"{name} {_fmt(t)}"
            if "fwdbwd" in m.get("x_matmul", {}):
                text += f" ({m['x_matmul']['fwdbwd']:.2f}x)"
            mem = m.get("extra_mem_mib", m.get("peak_mem_mib", {}).get("fwdbwd"))
            if mem is not None:
                text += f" {mem:.0f}MiB"
            parts.append(text)
        lines.append(f"  {case.get('label')} {case.get('head')}: " + " | ".join(parts))
    return lines


def grpo_step_lines(data: dict, vllm_rows: bool = True) -> list[str]:
    """One line per (model, trainer): tokens/s, peak memory, seconds per step and the
    ratios the issues target (against TRL's HF-generate and vLLM rows, and fastrl+vllm
    against fastrl); `vllm_rows`: say so when no +vllm row ran (the GRPO step's)."""
    lines = []
    for r in data.get("results", []):
        head = f"  {r.get('model')} {r.get('trainer')}: "
        if r.get("error"):
            lines.append(head + str(r["error"]))
            continue
        mem = r.get("peak_allocated_gib") or r.get("peak_rss_gib")
        parts = [f"{_fmt(r.get('tokens_per_second'))} tok/s", f"peak {_fmt(mem)} GiB",
                 f"{_fmt(r.get('seconds_per_step'))} s/step "
                 f"({_fmt(r.get('generate_seconds_per_step'))} s generate)"]  # fmt: skip
        for key in ("speed_vs_trl", "memory_vs_trl", "speed_vs_trl_vllm", "memory_vs_trl_vllm",
                    "speed_vs_fastrl"):  # fmt: skip
            if r.get(key) is not None:
                parts.append(f"{key} {r[key]:.2f}")
        lines.append(head + ", ".join(parts))
    ran = data.get("results", [])
    if vllm_rows and not any(str(r.get("trainer", "")).endswith("+vllm") for r in ran):
        lines.append("  +vllm rows not run: vllm is not importable by this python")
    return lines


def gae_lines(data: dict) -> list[str]:
    """One line per shape: each method's microseconds and share of a copy's speed (issue
    14's target: >= target_of_copy)."""
    target = data.get("config", {}).get("target_of_copy", 0.7)
    lines = []
    for case in data.get("rows", []):
        parts = []
        for name, m in case.get("methods", {}).items():
            if m.get("status") != "ok":
                parts.append(f"{name} {m.get('status')} ({m.get('reason', '?')})")
            elif "of_copy" in m:
                miss = "" if m["of_copy"] >= target or name == "torch" else " MISSES"
                parts.append(f"{name} {m['ms'] * 1e3:.1f}us {m['of_copy']:.2f}{miss}")
            else:
                parts.append(f"{name} {m['ms'] * 1e3:.1f}us")
        lines.append(f"  {case.get('B')}x{case.get('T')} {case.get('dtype')}: " + " | ".join(parts))
    return lines


def junit_line(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        return f"gpu tests: no junit ({type(e).__name__})"
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    failing = [
        f"{c.get('classname', '')}::{c.get('name', '')}"
        for c in root.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    text = (f"gpu tests: {passed} passed, {count['failures']} failed, {count['errors']} errors, "
            f"{count['skipped']} skipped")  # fmt: skip
    return text + ("".join(f"\n  FAILED {n}" for n in failing[:15]) if failing else "")


def memcheck_line(tree: Path, stage: dict) -> str:
    log = tree / "memcheck.log"
    if stage["status"] == "skipped":
        return f"memcheck: skipped ({stage.get('reason')})"
    if not log.exists():
        return "memcheck: no log"
    text = log.read_text(errors="replace")
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    kinds = sorted(
        set(re.findall(r"=+ (Invalid __\w+__ \w+ of size \d+ bytes|[A-Z][\w ]+error)", text))
    )
    return f"memcheck: {found[-1] if found else '?'} errors" + (
        f" ({'; '.join(kinds[:5])})" if kinds else ""
    )


def report(tree: Path) -> int:
    summary = _load(tree / "summary.json") or {"stages": []}
    env = _load(tree / "env.json") or {}
    stages = {s["name"]: s for s in summary["stages"]}
    results = tree / "results"
    out: list[str] = []
    gpu = env.get("gpu", {})
    smi = env.get("nvidia_smi", {})
    commit = (env.get("commit") or "?")[:10] + ("+dirty" if env.get("dirty") else "")
    out.append(
        f"gpu_check {summary.get('mode')} on {env.get('device', '?')} "
        f"({gpu.get('multi_processor_count', '-')} SMs, driver {smi.get('driver_version', '-')}, "
        f"SM clock {smi.get('clocks.sm', '-')}/{smi.get('clocks.max.sm', '-')} MHz) | "
        f"torch {env.get('torch', '?')} | triton {env.get('triton', '?')} | "
        f"{env.get('date', '')} | commit {commit} | source {env.get('source', {}).get('sha256')}"
    )
    out.append(
        "stages: "
        + " | ".join(f"{s['name']} {s['status']} {s['seconds']:.0f}s" for s in summary["stages"])
        + f" | elapsed {summary.get('elapsed_s', '?')}s of {summary.get('budget_s')}s"
    )
    for s in summary["stages"]:  # memcheck has a line of its own below
        if s["status"] != "ok" and s.get("reason") and s["name"] != "memcheck":
            out.append(f"  {s['name']}: {s['status']}: {s['reason']}")

    smoke = _load(tree / "smoke.json")
    if smoke:
        bad = [c for c in smoke.get("calls", []) if c.get("status") != "ok"]
        out.append(f"smoke: {len(smoke.get('calls', []))} calls {smoke.get('counts')}"
                   + (f"; {smoke['aborted']}" if smoke.get("aborted") else ""))  # fmt: skip
        for c in bad[:10]:
            out.append(f"  {c['status']}: {c['call']} {c['variant']} {c['dtype']} "
                       f"{c.get('reason') or c.get('rel_err')}")  # fmt: skip

    for path in sorted(results.glob("numerics-*.json")):
        data = _load(path) or {}
        rows = data.get("rows", [])
        fails = [r for r in rows if not r.get("passes")]
        out.append(f"numerics (same-weight KL < {data.get('config', {}).get('kl_max')}, no clip): "
                   f"{len(rows) - len(fails)}/{len(rows)} rows pass")  # fmt: skip
        for r in fails[:8]:
            out.append(f"  FAIL {r['dtype']} {r['impl']} {r['design']} {r['chunk']} {r['level']}: "
                       f"kl={r.get('kl', r.get('metric_kl'))} max|d|={r.get('max_abs_diff')} "
                       f"clipped={r.get('clipped_fraction')} {r.get('error', '')}")  # fmt: skip

    for path in sorted(results.glob("padding-*.json")):
        data = _load(path) or {}
        target = data.get("config", {}).get("target")
        out.append(f"padding (25% valid / all valid, target <= {target}):")
        for r in data.get("rows", []):
            text = (f"{r['ratio']:.2f}" + ("" if r.get("meets_target") else " MISSES")
                    if "ratio" in r else r.get("error", "?"))  # fmt: skip
            out.append(f"  {r['op']} {r['impl']} {r['variant']} {r.get('mode', '')}: {text}")

    for path in sorted(results.glob("grpo_step-*.json")):
        out.append(f"grpo_step ({path.name}; one GRPO LoRA step):")
        out += grpo_step_lines(_load(path) or {})

    for path in sorted(results.glob("ppo_step-*.json")):
        out.append(f"ppo_step ({path.name}; one PPO LoRA step):")
        out += grpo_step_lines(_load(path) or {}, vllm_rows=False)

    for path in sorted(results.glob("gae-*.json")):
        data = _load(path) or {}
        target = data.get("config", {}).get("target_of_copy")
        out.append(f"gae ({path.name}; microseconds, share of a copy's speed, target >= {target}):")
        out += gae_lines(data)

    for path in sorted(results.glob("*.json")):
        data = _load(path) or {}
        if "cases" not in data:
            continue
        out.append(f"{data.get('benchmark')} ({path.name}; fwdbwd ms, x cuBLAS, memory):")
        out += bench_lines(data)
        png = path.with_suffix(".png")
        if data["cases"] and (not png.exists() or png.stat().st_mtime < path.stat().st_mtime):
            out.append(f"  plot: {draw(path)}")

    if (tree / "gpu_tests.xml").exists():
        out.append(junit_line(tree / "gpu_tests.xml"))
    if "memcheck" in stages:
        out.append(memcheck_line(tree, stages["memcheck"]))
    files = sorted(p.name for p in results.glob("*") if p.suffix in (".json", ".png"))
    out.append(f"results ready for bench/results/: {', '.join(files) or 'none'}")

    text = "\n".join(out)
    (tree / "summary.md").write_text("# gpu_check\n\n```\n" + text + "\n```\n")
    summary["headline"] = out
    _write(tree / "summary.json", summary)
    print(text)
    return 0


def draw(path: Path) -> str:
    """bench/plot.py's PNG for a results file (the benchmark stopped before drawing it)."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        from bench.plot import plot

        return str(plot(path))
    except Exception as e:
        return f"failed: {type(e).__name__}: {str(e)[:200]}"
    finally:
        sys.path.remove(str(root))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "init":
        args = argv[2:]
        mode = args[args.index("--mode") + 1]
        budget = args[args.index("--budget") + 1]
        extra = [a for a in args if "=" in a and not a.startswith("--")]
        init(Path(argv[1]), mode, budget, extra)
        return 0
    if len(argv) == 10 and argv[0] == "record":
        record(Path(argv[1]), *argv[2:])
        return 0
    if len(argv) == 2 and argv[0] == "report":
        os.environ.setdefault("MPLBACKEND", "Agg")
        return report(Path(argv[1]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
