"""One PPO LoRA step end to end: fastrl's PPOTrainer (policy LoRA + value head on one
backbone), and verl's PPO (actor LoRA, critic on a second backbone) where a python with
verl is found.

    python bench/bench_ppo_step.py                                  # 1.5B, 24 GiB cap
    python bench/bench_ppo_step.py --models tiny --device cpu --completion-length 8

A step is one rollout (`generate` of `--rollout-size` completions of exactly
`--completion-length` tokens after `--prompt-length`-token prompts, the rewards, the
no-grad policy+value pass and the reference pass, the KL penalty (`--kl-coef`) in the
rewards, GAE and whitening) plus one PPO epoch of one mini-batch: the loss (fastrl:
clipped policy + `vf_coef` x clipped value; verl: the critic's clipped value loss and the
actor's clipped policy loss, each with its own optimizer), the backward and the optimizer
step. The checkpoint is `bench_grpo_step`'s (random weights from the model's
config, built once under `--cache-dir`); LoRA r=16/alpha=32 on every block linear,
gradient checkpointing, bf16 on CUDA.

Each (model, trainer) pair runs in its own subprocess (CUDA memory capped at
`--max-memory-gb`); reported: peak allocated / reserved GPU GiB, peak resident host
memory, seconds per step (the first `--warmup` steps excluded), of which generation, and
tokens/s (prompt + completion tokens of the rollout). Results:
bench/results/ppo_step-<device>-<date>.json.

Peers. `verl` (bench/bench_ppo_verl.py): verl 0.9.1's own actor, reference and critic
workers and its advantage math, in one process without Ray, generating with HF `generate`
on the actor's module (verl's real rollout is a vLLM/SGLang server); its critic is a
separate backbone. It runs in `--verl-python` (default: this python if it has verl, else
`.venv-verl/bin/python` where that exists, else the row says "not installed"). `openrlhf`:
not run; its model classes import flash_attn when imported, so it needs a GPU machine with
flash-attn built, and its runner (a Ray launch of its PPO trainer) is still to be written.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    if (Path(_root) / "fastrl" / "kernels").exists():
        # this checkout's fastrl (a worktree's), not whichever one is installed; fastrl's
        # import is lazy, so nothing looks for Hugging Face's `kernels` meanwhile
        import fastrl  # noqa: F401

    sys.path.remove(_root)

from bench.bench_grpo_step import (  # noqa: E402
    MODELS,
    _GenerateTimer,
    _step_timer,
    prepare_run,
    step_figures,
    varied_reward,
)
from bench.common import default_results_path, environment, write_json  # noqa: E402

TRAINERS = ("fastrl", "openrlhf", "verl")
DEFAULT_TRAINERS = TRAINERS
_REPO = Path(__file__).resolve().parent.parent


def _has_module(python: str, module: str) -> bool:
    """Whether `python` (an interpreter's path) can import `module`."""
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def default_verl_python() -> str | None:
    """The interpreter of the verl row: this one if it has verl, else the repo's
    `.venv-verl` (`make venv-verl`) where it exists, else None."""
    if importlib.util.find_spec("verl") is not None:
        return sys.executable
    venv = _REPO / ".venv-verl" / "bin" / "python"
    return str(venv) if venv.exists() else None


def peer_status(trainer: str, verl_python: str | None = None) -> str | None:
    """None where the trainer can run here, else why not (a row's `error`). `verl_python`:
    the verl row's interpreter (None: `default_verl_python()`)."""
    if trainer == "fastrl":
        return None
    if trainer == "verl":
        python = verl_python or default_verl_python()
        if python is None:
            return "not installed"
        if not _has_module(python, "verl"):
            return f"not installed (in {python})"
        return None
    if importlib.util.find_spec(trainer) is None:
        return "not installed"
    return (
        "installed, but its runner is not written (its models import flash_attn at import "
        "time; a Ray launch of its PPO trainer on a GPU machine)"
    )


def run_one(opts: argparse.Namespace) -> dict:
    """Train `opts.warmup + opts.steps` PPO steps with `opts.trainer`; return the
    measurements."""
    if opts.trainer == "verl":
        from bench.bench_ppo_verl import run_verl

        return run_verl(opts)
    if opts.trainer != "fastrl":
        raise ValueError(f"trainer {opts.trainer!r} has no runner; runners: fastrl, verl")
    from datasets import Dataset

    from fastrl.trainers import PPOConfig, PPOTrainer

    cuda = torch.cuda.is_available()
    path, tokenizer, prompts = prepare_run(opts, opts.rollout_size * (opts.warmup + opts.steps))
    args = PPOConfig(
        output_dir=str(Path(opts.cache_dir) / "out-ppo-fastrl"),
        per_device_train_batch_size=opts.rollout_size, num_ppo_epochs=1, num_mini_batches=1,
        max_completion_length=opts.completion_length, temperature=1.0, kl_coef=opts.kl_coef,
        learning_rate=1e-6, max_steps=opts.warmup + opts.steps, logging_steps=1,
        save_strategy="no", report_to="none", seed=0, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": opts.completion_length}, disable_tqdm=True,
        bf16=cuda, use_cpu=not cuda, lora_r=16, lora_alpha=32,
        load_in_4bit=MODELS[opts.models]["four_bit"] and cuda,
        attn_implementation=opts.attn_implementation, use_chat_template=False,
    )  # fmt: skip
    timer = _step_timer(_GenerateTimer())
    trainer = PPOTrainer(
        str(path), varied_reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        callbacks=[timer], processing_class=tokenizer,
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = opts.rollout_size * (opts.prompt_length + opts.completion_length)
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    return dict(
        **step_figures(timer.steps, opts.warmup, tokens),
        last_log={k: last[k] for k in ("loss", "loss/value_avg", "objective/kl") if k in last},
    )


def _worker_command(opts: argparse.Namespace, model: str, trainer: str = "fastrl") -> list[str]:
    python = sys.executable
    if trainer == "verl":
        python = opts.verl_python or default_verl_python()
    cmd = [python, __file__, "--worker", "--models", model, "--trainer", trainer]
    for key in ("steps", "warmup", "kl_coef", "max_memory_gb", "rollout_size", "prompt_length",
                "completion_length", "cache_dir", "attn_implementation"):  # fmt: skip
        cmd += [f"--{key.replace('_', '-')}", str(getattr(opts, key))]
    return cmd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen2.5-1.5b", help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS), help=f"of {TRAINERS}")
    p.add_argument("--steps", type=int, default=2, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="steps run first, not measured")
    p.add_argument("--kl-coef", type=float, default=0.05, help="TRL's PPO default")
    p.add_argument("--max-memory-gb", type=float, default=24.0, help="CUDA cap; 0: none")
    p.add_argument("--rollout-size", type=int, default=8, help="completions per rollout")
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--completion-length", type=int, default=1024)
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/fastrl-bench"))
    p.add_argument("--device", default="auto", help="auto | cpu (hides CUDA from workers)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    p.add_argument(
        "--verl-python", default=None,
        help="the verl row's interpreter (default: this one if it has verl, else .venv-verl's)",
    )  # fmt: skip
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=TRAINERS, default="fastrl", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        print("RESULT " + json.dumps(run_one(opts)), flush=True)
        return
    models, trainers = opts.models.split(","), opts.trainers.split(",")
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; models: {sorted(MODELS)}")
    for name in trainers:
        if name not in TRAINERS:
            raise ValueError(f"unknown trainer {name!r}; trainers: {TRAINERS}")
    env = dict(os.environ)
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    rows = []
    for model in models:
        for trainer in trainers:
            row = dict(model=model, trainer=trainer)
            if trainer == "verl":
                row["python"] = opts.verl_python or default_verl_python()
            why = peer_status(trainer, opts.verl_python)
            if why is not None:
                row["error"] = why
                print(f"{trainer}: {why}", file=sys.stderr)
                rows.append(row)
                continue
            try:
                done = subprocess.run(
                    _worker_command(opts, model, trainer), capture_output=True, text=True, env=env,
                    timeout=opts.timeout,
                )  # fmt: skip
                out, err, code = done.stdout, done.stderr, done.returncode
            except subprocess.TimeoutExpired:
                out, err, code = "", f"timed out after {opts.timeout} s", -1
            result = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if code == 0 and result:
                row.update(json.loads(result[-1][len("RESULT ") :]))
            else:
                row["error"] = "OOM" if "out of memory" in err.lower() else "failed"
                row["stderr_tail"] = err[-2000:]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("steps", "stderr_tail")}))
    config = {k: v for k, v in vars(opts).items() if k not in ("worker", "out")}
    results = dict(benchmark="ppo_step", config=config, environment=environment(device),
                   results=rows)  # fmt: skip
    out_path = write_json(results, opts.out or default_results_path(device, "ppo_step-"))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
