"""Where a gpu_check run measured: GPU, SMs, clocks, driver, CUDA, torch/Triton and the
peers' versions, TF32 settings, tools, the source it ran -> env.json.

    python tools/gpu_env_info.py --out DIR/env.json [--repo REPO]

Also the results' file stem `<device>-<date>` (bench/results' names), which
tools/gpu_check.sh reads back. Never fails for a missing tool or field: it records why.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench.common as bc  # noqa: E402

sys.path.pop(0)  # so that the checkout's kernels/ cannot shadow Hugging Face's `kernels`

import torch  # noqa: E402

# nvidia-smi --query-gpu fields; a driver that lacks one rejects the whole query, so a
# failing query is retried field by field
SMI_FIELDS = (
    "name", "driver_version", "pci.bus_id", "memory.total", "memory.used", "pstate",
    "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "clocks.applications.graphics",
    "power.draw", "power.limit", "temperature.gpu", "persistence_mode", "compute_mode",
    "mig.mode.current", "ecc.mode.current", "clocks_event_reasons.active",
)  # fmt: skip


def _run(cmd: list[str], timeout: float = 20.0) -> tuple[int | None, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return None, bc.error_reason(e)
    return out.returncode, (out.stdout + out.stderr).strip()


def nvidia_smi() -> dict:
    if shutil.which("nvidia-smi") is None:
        return {"status": "absent"}
    base = ["nvidia-smi", "--format=csv,noheader,nounits"]
    rc, text = _run([*base, "--query-gpu=" + ",".join(SMI_FIELDS)])
    fields: dict[str, str] = {}
    if rc == 0 and text:
        fields = dict(
            zip(SMI_FIELDS, (v.strip() for v in text.splitlines()[0].split(",")), strict=False)
        )
    else:
        for f in SMI_FIELDS:
            rc, text = _run([*base, "--query-gpu=" + f])
            fields[f] = text.splitlines()[0].strip() if rc == 0 and text else f"n/a ({text[:80]})"
    rc, table = _run(["nvidia-smi"])
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", table or "")
    return {"status": "ok", **fields, "driver_cuda": cuda and cuda.group(1), "table": table}


def tool_version(name: str, candidates: list[str]) -> dict:
    """A CUDA tool's path and the last line of its --version, or that it is absent."""
    path = shutil.which(name) or next((c for c in candidates if os.access(c, os.X_OK)), None)
    if path is None:
        return {"status": "absent"}
    rc, text = _run([path, "--version"])
    return {"path": path, "version": (text.splitlines() or ["?"])[-1] if rc == 0 else text[:200]}


def cuda_tool_dirs() -> list[str]:
    homes = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"]
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda-*"))
    return [f"{h}/bin" for h in homes if h]


def gpu_properties(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    out = {"name": props.name, "capability": f"{props.major}.{props.minor}"}
    for key in (
        "multi_processor_count", "total_memory", "L2_cache_size",
        "max_threads_per_multi_processor", "regs_per_multiprocessor",
        "shared_memory_per_block_optin", "shared_memory_per_multiprocessor", "warp_size",
        "clock_rate", "memory_clock_rate", "memory_bus_width", "uuid",
    ):  # fmt: skip
        if hasattr(props, key):
            value = getattr(props, key)
            out[key] = value if isinstance(value, int | float | str) else str(value)
    return out


def precision_settings() -> dict:
    """TF32 and reduced-precision settings: they change what an fp32 reference means."""
    cuda_mm = torch.backends.cuda.matmul
    out = {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda.matmul.allow_tf32": cuda_mm.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_bf16_reduced_precision_reduction": getattr(
            cuda_mm, "allow_bf16_reduced_precision_reduction", None
        ),
        "cuda.matmul.allow_fp16_reduced_precision_reduction": getattr(
            cuda_mm, "allow_fp16_reduced_precision_reduction", None
        ),
    }
    for name, obj in (("cuda.matmul", cuda_mm), ("cudnn", torch.backends.cudnn)):
        if hasattr(obj, "fp32_precision"):  # torch >= 2.9's API
            out[f"{name}.fp32_precision"] = str(obj.fp32_precision)
    return out


def source_digest(repo: Path) -> dict:
    """sha256 over the code that ran (names and bytes), to match results to a source tree
    where no git checkout travelled."""
    h = hashlib.sha256()
    files = 0
    for top in ("fastrl", "kernels", "bench", "tools", "tests", "pyproject.toml"):
        root = repo / top
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for p in paths:
            if p.is_file() and p.suffix in (".py", ".sh", ".toml") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(repo)).encode() + b"\0" + p.read_bytes())
                files += 1
    return {"sha256": h.hexdigest()[:16], "files": files}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="env.json path")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent))
    args = p.parse_args(argv)

    device = bc.resolve_device("auto")
    env = bc.environment(device)
    env["stem"] = f"{env['device_slug']}-{env['date']}"
    env["precision"] = precision_settings()
    env["torch_build"] = {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "debug": torch.version.debug,
    }
    if device.type == "cuda":
        env["gpu"] = gpu_properties(device)
        env["cuda_device_count"] = torch.cuda.device_count()
    env["nvidia_smi"] = nvidia_smi()
    dirs = cuda_tool_dirs()
    env["tools"] = {
        name: tool_version(name, [f"{d}/{name}" for d in dirs])
        for name in ("nvcc", "compute-sanitizer", "ncu", "ptxas")
    }
    try:
        import fastrl

        env["fastrl_path"] = str(Path(fastrl.__file__).parent)
    except Exception as e:
        env["fastrl_path"] = f"not importable: {bc.error_reason(e)}"
    env["source"] = source_digest(Path(args.repo))
    env["environ"] = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(("FASTRL_", "TRITON_", "PYTORCH_", "CUDA_", "NVIDIA_", "OMP_"))
    }
    env["cpu"] = {"name": bc.cpu_name(), "count": os.cpu_count(), "kernel": platform.release()}
    bc.write_json(env, args.out)
    gpu = env.get("gpu", {})
    smi = env["nvidia_smi"]
    print(
        f"{env['device']} ({gpu.get('multi_processor_count', '-')} SMs, "
        f"SM clock {smi.get('clocks.sm', '-')}/{smi.get('clocks.max.sm', '-')} MHz, "
        f"driver {smi.get('driver_version', '-')}) | torch {env['torch']} "
        f"(CUDA {torch.version.cuda}) | triton {env['triton']} | "
        f"tf32 {env['precision']['cuda.matmul.allow_tf32']} | stem {env['stem']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
