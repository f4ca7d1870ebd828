"""Kernel configs in one place: one default per kernel, autotuning only when asked for.

`FASTRL_AUTOTUNE=1` turns the short per-kernel lists into a `triton.autotune` search;
otherwise (and always under the interpreter, which cannot benchmark) the first config
is used without benchmarking. The interpreter also gets small tiles of its own: it runs
one Python step per program and loop iteration, so big tiles only cost time there.
"""

import functools
import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("FASTRL_AUTOTUNE") == "1" and not INTERPRET

# Vocab splits of the forward start at multiples of this many columns, so that every
# BLOCK_V below divides a split and the split count can be chosen before the tiles are.
SPLIT_ALIGN = 256


def _cfg(n: int, v: int, d: int, warps: int, stages: int, **extra) -> triton.Config:
    return triton.Config(
        {"BLOCK_N": n, "BLOCK_V": v, "BLOCK_D": d, **extra}, num_warps=warps, num_stages=stages
    )


_INTERPRET_CFG = _cfg(16, 64, 32, 1, 1)
_INTERPRET_BWD_CFG = _cfg(16, 64, 32, 1, 1, GROUP_N=2)

LINEAR_LOGPROBS_FWD = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 256, 64, 8, 3),
    _cfg(64, 256, 64, 4, 4),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 32, 4, 4),
]
LINEAR_LOGPROBS_BWD = [
    _cfg(128, 128, 64, 8, 3, GROUP_N=8),
    _cfg(128, 256, 64, 8, 3, GROUP_N=8),
    _cfg(64, 128, 64, 4, 4, GROUP_N=8),
    _cfg(128, 128, 32, 4, 4, GROUP_N=16),
]
# fp32 inputs: the same tiles with half the BLOCK_D. With BLOCK_D 64 their staged operand
# tiles took 128 KB of shared memory, over the 99 KB a block gets on sm_86/sm_89 (the 24 GB
# RTX 3090/4090); now 64 KB. The half-precision defaults take 96 KB on sm_90, 64 KB there.
# tests/support/compile_for_gpu.py checks every default against each target's budget.
LINEAR_LOGPROBS_FWD_FP32 = [_cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 3)]
LINEAR_LOGPROBS_BWD_FP32 = [_cfg(128, 128, 32, 8, 3, GROUP_N=8), _cfg(64, 128, 32, 4, 3, GROUP_N=8)]


def configs(space: list[triton.Config], interpret_cfg: triton.Config) -> list[triton.Config]:
    if INTERPRET:
        return [interpret_cfg]
    return space if AUTOTUNE else space[:1]


def autotune(space: list[triton.Config], interpret_cfg: triton.Config, key: list[str], **kw):
    """`triton.autotune` over `space` when FASTRL_AUTOTUNE=1, else over its first config."""
    return triton.autotune(configs(space, interpret_cfg), key=key, **kw)


# Loss-only kernels (group advantages, per-token policy loss): memory-bound work on [B] or
# [B, T] that takes microseconds, so one fixed tile each and no autotuning. The
# interpreter gets small tiles so that test shapes span several programs and tails.
GROUP_ADVANTAGES_TILE = 16 if INTERPRET else 1024  # completions per program (groups x slots)
GROUP_ADVANTAGES_BATCH_BLOCK = 16 if INTERPRET else 1024  # the one-program batch pass
POLICY_LOSS_BLOCK_T = 16 if INTERPRET else 1024  # tokens of one row per program
# rows of Z per program. The row kernel is bandwidth-bound, so the grid should cover every
# SM: a 64 MiB chunk of a 128k-152k bf16 vocab is 220-256 rows, 55-64 programs at 4 rows
# (fewer than an H100's 132 SMs) and 220-256 at 1 (48 registers a thread, no spills). Not
# yet measured on a GPU. The interpreter keeps 4 to test multi-row tiles and row tails.
FUSED_POLICY_BLOCK_N = 4 if INTERPRET else 1
FUSED_POLICY_BLOCK_V = 64 if INTERPRET else 2048  # vocab columns per step
# 8 warps per [rows, 2048] step (with 4 rows of 4 warps the fp32 tiles took 255 registers
# a thread and spilled 192 bytes on sm_90, `ptxas -v`).
FUSED_POLICY_NUM_WARPS = 8

# cuBLAS-chunk linear_logprobs (kernels/cublas_logprobs.py). Chunk defaults (override with
# the launchers' chunk_rows/chunk_vocab or FASTRL_CUBLAS_CHUNK_ROWS/_VOCAB): the forward
# keeps one fp32 [rows, vocab] logits chunk, 1024 x 16384 x 4 B = 64 MiB; the backward
# adds a half dz chunk and an fp32 [rows, d] dH accumulator, so it takes half the vocab:
# 1024 x 8192 x (4 + 2) B + 1024 x 4096 x 4 B = 48 + 16 = 64 MiB at d = 4096 (bf16).
CUBLAS_CHUNK_ROWS = 1024  # a multiple of 128 (and 256): full cuBLAS tiles
CUBLAS_FWD_CHUNK_VOCAB = 16384
CUBLAS_BWD_CHUNK_VOCAB = 8192
# Epilogue tiles. Forward: BLOCK_N rows per program, a loop over the chunk's columns in
# BLOCK_V steps (per-lane running statistics, one reduction after the loop); backward:
# one [BLOCK_N, BLOCK_V] tile per program. 8 warps x 8 fp32 a thread per step. Not yet
# measured on a GPU. The interpreter keeps multi-row tiles and short steps so the test
# shapes exercise row and column tails.
CUBLAS_FWD_BLOCK_N = 4 if INTERPRET else 1
CUBLAS_FWD_BLOCK_V = 128 if INTERPRET else 2048
CUBLAS_BWD_BLOCK_N = 4 if INTERPRET else 1
CUBLAS_BWD_BLOCK_V = 128 if INTERPRET else 2048
CUBLAS_NUM_WARPS = 8
# Frozen-head two-GEMM design (kernels/frozen_logprobs.py): its epilogue sweeps each row of
# a chunk twice, one row per program as the cublas forward epilogue. Not yet measured.
FROZEN_BLOCK_N = 4 if INTERPRET else 1
FROZEN_BLOCK_V = 128 if INTERPRET else 2048
FROZEN_NUM_WARPS = 8
# GAE (kernels/gae.py): rows per program and tokens per scan step. One program walks its
# rows' tokens right to left, so the grid is cdiv(B, BLOCK_B): 1 row a program covers the
# SMs from B >= 132. Not yet measured on a GPU (the launcher takes both for a sweep). The
# interpreter keeps several rows and short steps, so row and token tails are exercised.
GAE_BLOCK_B = 4 if INTERPRET else 1
GAE_BLOCK_T = 8 if INTERPRET else 1024
GAE_NUM_WARPS = 4
# Tokens per program when a row is split (two passes, kernels/gae.py): 0 keeps one program
# per row block. Splitting fills the SMs when B is small (64 rows of 4096 tokens are 64
# programs on 132 SMs) at the price of reading the inputs twice; off until a GPU measures
# it (bench/bench_gae.py sweeps it). The interpreter splits, so both passes are tested.
GAE_CHUNK_T = 16 if INTERPRET else 0


def on_tensor_device(launcher):
    """Run `launcher` with its first tensor argument's GPU current: Triton launches on the
    current device, and device_map="auto" (or a second GPU) puts tensors elsewhere."""

    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or t.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(t.device):
            return launcher(*args, **kwargs)

    return launch
