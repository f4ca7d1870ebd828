#!/usr/bin/env bash
# Wheels for the packages the lent GPU machines lack (their image, Python 3.12, has torch,
# triton, transformers, peft, accelerate, tokenizers, pandas, pyarrow, matplotlib, pytest,
# pytest-xdist, but no network): run here, where pip works, then name .whl in the device
# tool's `carry` and start the command there with tools/gpu_env.sh. See
# /work/.library/device/README.md and KINDS.md for the image's package list.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done
# trl and what datasets needs beyond the image; the benchmarks' baselines; bitsandbytes for
# the 4-bit 7B of bench_grpo_step (43 MB: ~46 MB in all, under a call's 64 MiB carry).
PACKAGES=(trl==1.16.0 datasets dill multiprocess liger-kernel cut-cross-entropy bitsandbytes)
python3 -m pip download -q "${args[@]}" "${PACKAGES[@]}"
ls -la .whl
du -sh .whl
