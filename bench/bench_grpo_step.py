"""One GRPO LoRA training step end to end: fastrl's GRPOTrainer against TRL's, same model,
same settings, same run; and TRL's GRPOTrainer under `fastrl.integrations.patch_trl`
(`trl-patched`: TRL's trainer, fastrl's fused head).

    python bench/bench_grpo_step.py                         # 1.5B and 7B (4-bit), 24 GiB cap
    python bench/bench_grpo_step.py --models qwen2.5-1.5b --steps 3 --beta 0.04
    python bench/bench_grpo_step.py --models qwen2.5-vocab-small --device cpu \
        --prompt-length 64 --completion-length 256          # CPU: host memory only

A step is generation (`generate` with its KV cache, G completions of exactly
`--completion-length` tokens: `min_new_tokens` holds EOS back) + rewards + the loss + the
backward + the optimizer step, on `--prompts-per-step` prompts of `--prompt-length`
tokens. Both trainers get the same checkpoint (random weights from the model's config,
saved once under `--cache-dir` and loaded from there, the real-checkpoint path), LoRA
r=16/alpha=32 on every linear layer of the blocks, gradient checkpointing, bf16 (4-bit NF4
base for the 7B), the same attention implementation, DAPO loss, `--beta`.

Each (model, trainer) pair runs in its own subprocess with its CUDA memory capped at
`--max-memory-gb` (`torch.cuda.set_per_process_memory_fraction`): the peak is the
process's own, and an out-of-memory error is a result ("does not fit"), not the end of
the run. Reported per pair: peak allocated / reserved GPU GiB, the process's peak
resident host memory (the memory measure of a CPU run), seconds per step (the first
`--warmup` steps excluded), of which generation, and tokens/s (prompt + completion tokens
of the step). Results: bench/results/grpo_step-<device>-<date>.json and a PNG.
The issue-5 target: fastrl at most 60% of TRL's peak memory and no slower.

On a CPU, `--models qwen2.5-vocab-small --device cpu` (Qwen2.5's 151,936-token vocabulary
on a 2-layer, d=256 body) shows the head's share of a step's memory, where it dominates.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: import the `bench` package from the repo root, then take the root
    # off sys.path again so that its kernels/ cannot shadow Hugging Face's `kernels`
    # (transformers and TRL look for it).
    _root = str(Path(__file__).resolve().parent.parent)
    sys.path.insert(0, _root)
    import bench.common  # noqa: F401

    sys.path.remove(_root)

from bench.common import default_results_path, environment, write_json  # noqa: E402

# Architectures of the Qwen2.5 checkpoints (their config.json); weights are random.
MODELS = {
    "qwen2.5-1.5b": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, four_bit=False,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, four_bit=True,
    ),
    # Qwen2.5's vocabulary on a small body: the head-dominated case, small enough for a CPU
    "qwen2.5-vocab-small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, four_bit=False,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, four_bit=False,
    ),
}  # fmt: skip
# trl-patched: TRL's GRPOTrainer with fastrl's head in it (fastrl.integrations.patch_trl)
TRAINERS = ("fastrl", "trl", "trl-patched")
# the same, generating on a colocated vLLM engine (use_vllm=True, vllm_mode="colocate"):
# run with --vllm-python (the .venv-vllm interpreter by default), not part of the default set
VLLM_TRAINERS = ("fastrl+vllm", "trl+vllm", "trl-patched+vllm")
ALL_TRAINERS = TRAINERS + VLLM_TRAINERS
_REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ checkpoint


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id (`w<i>`), so any sampled id decodes and
    a prompt of n space-separated words is exactly n tokens. Ids 0-2: pad, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def checkpoint(name: str, cache_dir: Path) -> Path:
    """The model's checkpoint directory (config, random bf16 weights, tokenizer), built once."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = cache_dir / name
    if (path / "config.json").exists():
        return path
    arch = {k: v for k, v in MODELS[name].items() if k != "four_bit"}
    config = Qwen2Config(
        **arch, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"building {name} ({device}, random weights) -> {path}", file=sys.stderr)
    with torch.device(device):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    # in its own folder: next to a qwen2 config.json, AutoTokenizer would pick Qwen2's class
    synthetic_tokenizer(config.vocab_size).save_pretrained(tmp / "tokenizer")
    del model
    tmp.rename(path)
    return path


# ------------------------------------------------------------------ one trainer


def varied_reward(prompts, completions, **kwargs) -> list[float]:
    """Cheap, deterministic and different across a group (so advantages are not zero)."""
    return [float(len(set(c.split())) % 7) for c in completions]


class _GenerateTimer:
    """Adds up the seconds spent in `generate`: the model's (both trainers call it), or the
    vLLM engine's (fastrl's `VLLMEngine.generate`, TRL's `VLLMGeneration.generate`)."""

    def __init__(self, vllm: bool = False):
        self.seconds = 0.0
        if not vllm:
            from transformers import GenerationMixin

            self._wrap(GenerationMixin, "generate")
            return
        from fastrl.trainers.vllm_engine import VLLMEngine

        self._wrap(VLLMEngine, "generate")
        try:
            from trl.generation.vllm_generation import VLLMGeneration
        except ImportError:  # fastrl+vllm needs no TRL
            return
        self._wrap(VLLMGeneration, "generate")

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)

        def timed(obj, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(obj, *args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - start

        setattr(owner, name, timed)


def _step_timer(gen_timer: _GenerateTimer):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start, self._gen = time.perf_counter(), gen_timer.seconds

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self._start
            self.steps.append(dict(seconds=seconds, generate_seconds=gen_timer.seconds - self._gen))

    return StepTimer()


def prepare_run(opts: argparse.Namespace, n_prompts: int) -> tuple[Path, object, list[str]]:
    """A worker's set-up: the CUDA memory capped at `opts.max_memory_gb`, the checkpoint of
    `opts.models` (saved once), its tokenizer, and `n_prompts` random prompts of
    `opts.prompt_length` words (seed 0)."""
    import random

    from transformers import AutoTokenizer

    if torch.cuda.is_available() and opts.max_memory_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, opts.max_memory_gb * 2**30 / total))
    path = checkpoint(opts.models, Path(opts.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    rng = random.Random(0)
    words = MODELS[opts.models]["vocab_size"] - 3
    prompts = [
        " ".join(f"w{3 + rng.randrange(words)}" for _ in range(opts.prompt_length))
        for _ in range(n_prompts)
    ]
    return path, tokenizer, prompts


def run_one(opts: argparse.Namespace) -> dict:
    """Train `opts.warmup + opts.steps` steps with one trainer; return its measurements."""

    from datasets import Dataset
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    spec = MODELS[opts.models]
    path, tokenizer, prompts = prepare_run(opts, opts.prompts_per_step * (opts.warmup + opts.steps))
    dataset = Dataset.from_dict({"prompt": prompts})
    G = opts.num_generations
    four_bit = spec["four_bit"] and cuda
    common = dict(
        output_dir=str(Path(opts.cache_dir) / f"out-{opts.trainer}"),
        per_device_train_batch_size=G * opts.prompts_per_step, num_generations=G,
        max_completion_length=opts.completion_length, temperature=1.0, beta=opts.beta,
        loss_type="dapo", learning_rate=1e-6, max_steps=opts.warmup + opts.steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": opts.completion_length}, disable_tqdm=True,
        gradient_checkpointing=True, bf16=cuda, use_cpu=not cuda,
    )  # fmt: skip
    attn = opts.attn_implementation
    vllm = opts.trainer.endswith("+vllm")
    trainer_name = opts.trainer.removesuffix("+vllm")
    gen_timer = _GenerateTimer(vllm=vllm)
    timer = _step_timer(gen_timer)
    # the engine: colocated, its context one prompt + completion, TRL's memory share on a
    # GPU, a fixed 1 GiB KV cache on a CPU (vLLM's CPU default is larger)
    engine = dict(
        use_vllm=True, vllm_mode="colocate",
        vllm_max_model_length=opts.prompt_length + opts.completion_length,
        vllm_gpu_memory_utilization=opts.vllm_gpu_memory_utilization,
    )  # fmt: skip
    if vllm and not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, for TRL's engine
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if trainer_name == "fastrl":
        from fastrl.trainers import GRPOConfig, GRPOTrainer

        extra = {}
        if vllm:
            extra = dict(engine, vllm_kv_cache_memory_bytes=None if cuda else 2**30)
        args = GRPOConfig(
            **common, lora_r=16, lora_alpha=32, load_in_4bit=four_bit,
            attn_implementation=attn, use_chat_template=False, **extra,
        )  # fmt: skip
        trainer = GRPOTrainer(
            str(path), varied_reward, args=args, train_dataset=dataset, callbacks=[timer],
            processing_class=tokenizer,
        )  # fmt: skip
    else:
        from transformers import BitsAndBytesConfig
        from trl import GRPOConfig, GRPOTrainer

        dtype = torch.bfloat16 if cuda else torch.float32
        extra = {}
        if vllm:  # TRL passes generation_kwargs to vLLM's SamplingParams: min_tokens there
            extra = dict(engine, generation_kwargs={"min_tokens": opts.completion_length})
        args = GRPOConfig(
            **{**common, **extra},
            model_init_kwargs={"dtype": dtype, "attn_implementation": attn},
        )
        quant = None
        if four_bit:
            quant = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )  # fmt: skip
        lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
        trainer = GRPOTrainer(
            str(path), varied_reward, args=args, train_dataset=dataset, callbacks=[timer],
            processing_class=tokenizer, quantization_config=quant, peft_config=lora,
        )  # fmt: skip
    patch = None
    if trainer_name == "trl-patched":
        from fastrl.integrations import patch_trl

        patch = patch_trl()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = G * opts.prompts_per_step * (opts.prompt_length + opts.completion_length)
    return dict(
        **step_figures(timer.steps, opts.warmup, tokens),
        # trl-patched: the fused-head calls fastrl served and those it left to TRL
        head_calls=None if patch is None else dict(fastrl=patch.calls, trl=patch.fallback_calls),
    )


def step_figures(steps: list[dict], warmup: int, tokens: int) -> dict:
    """A worker's row from its timed steps (`seconds`, `generate_seconds` each), the first
    `warmup` left out, and the `tokens` a step processes: seconds per step, of which
    generation, tokens/s, peak GPU memory and peak resident host memory."""
    cuda = torch.cuda.is_available()
    measured = steps[warmup:]
    seconds = sum(s["seconds"] for s in measured) / len(measured)
    generate = sum(s["generate_seconds"] for s in measured) / len(measured)
    return dict(
        seconds_per_step=seconds,
        generate_seconds_per_step=generate,
        tokens_per_second=tokens / seconds,
        peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        # the worker's peak resident memory (KiB on Linux): host memory, the measure on CPU
        peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        steps=steps,
    )


# ------------------------------------------------------------------ driver


def _worker_command(opts: argparse.Namespace, model: str, trainer: str) -> list[str]:
    python = sys.executable
    if trainer in VLLM_TRAINERS:
        python = opts.vllm_python or str(_REPO / ".venv-vllm" / "bin" / "python")
    cmd = [python, __file__, "--worker", "--models", model, "--trainer", trainer]
    forwarded = ["steps", "warmup", "beta", "max_memory_gb", "num_generations"]
    forwarded += ["prompt_length", "completion_length", "prompts_per_step", "cache_dir"]
    forwarded += ["attn_implementation", "vllm_gpu_memory_utilization"]
    for key in forwarded:
        cmd += [f"--{key.replace('_', '-')}", str(getattr(opts, key))]
    return cmd


def _row(rows: list[dict], model: str, trainer: str) -> dict:
    """The result row of (model, trainer); {} when it was not run."""
    return next((r for r in rows if r["model"] == model and r["trainer"] == trainer), {})


def _memory_key(rows: list[dict]) -> tuple[str, str]:
    """GPU peak allocated memory when measured, else the processes' peak RSS (CPU runs)."""
    if any(r.get("peak_allocated_gib") for r in rows):
        return "peak_allocated_gib", "peak GPU memory (GiB)"
    return "peak_rss_gib", "peak resident host memory (GiB)"


def _oom(text: str) -> bool:
    return "OutOfMemoryError" in text or "out of memory" in text


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    memory, memory_label = _memory_key(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in (
        (axes[0], memory, memory_label),
        (axes[1], "tokens_per_second", "tokens / s (prompt + completion)"),
    ):
        shown = [t for t in ALL_TRAINERS if any(_row(rows, m, t) for m in models)]
        width = 0.8 / len(shown)
        for j, trainer in enumerate(shown):
            found = [_row(rows, m, trainer) for m in models]
            xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, [r.get(key) or 0.0 for r in found], width=width, label=trainer)
            for x, r in zip(xs, found, strict=True):
                if r.get("error"):
                    ax.text(x, 0, r["error"], rotation=90, ha="center", va="bottom", fontsize=8)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        if key == "peak_allocated_gib" and results["config"]["max_memory_gb"]:
            ax.axhline(results["config"]["max_memory_gb"], color="k", ls="--", lw=1, label="cap")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(
        f"GRPO LoRA step: G={cfg['num_generations']}, prompt {cfg['prompt_length']} + "
        f"completion {cfg['completion_length']} tokens, beta={cfg['beta']} "
        f"({results['environment']['device']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", default="qwen2.5-1.5b,qwen2.5-7b", help=f"comma-separated, of {sorted(MODELS)}"
    )
    p.add_argument(
        "--trainers", default=",".join(TRAINERS), help=f"comma-separated, of {ALL_TRAINERS}"
    )
    p.add_argument("--steps", type=int, default=2, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="steps run first, not measured")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL default 0)")
    p.add_argument("--max-memory-gb", type=float, default=24.0, help="CUDA cap; 0: none")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=256)
    p.add_argument("--completion-length", type=int, default=1024)
    p.add_argument("--prompts-per-step", type=int, default=1)
    p.add_argument("--attn-implementation", default="sdpa")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3, help="+vllm rows")
    p.add_argument(
        "--vllm-python", default=None,
        help="the interpreter of the +vllm rows (default: .venv-vllm/bin/python)",
    )  # fmt: skip
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/fastrl-bench"))
    p.add_argument("--device", default="auto", help="auto | cpu (hides CUDA from workers)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/...)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=ALL_TRAINERS, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)

    if opts.worker:
        print("RESULT " + json.dumps(run_one(opts)), flush=True)
        return
    env = dict(os.environ)
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    models = opts.models.split(",")
    trainers = opts.trainers.split(",")
    for name in models + trainers:
        if name not in MODELS and name not in ALL_TRAINERS:
            raise ValueError(f"unknown model or trainer {name!r}; models: {sorted(MODELS)}")
    from tqdm.auto import tqdm

    rows = []
    for model in models:
        for trainer in tqdm(trainers, desc=model):
            cmd = _worker_command(opts, model, trainer)
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, env=env, timeout=opts.timeout
                )
                out, err, code = done.stdout, done.stderr, done.returncode
            except subprocess.TimeoutExpired:
                out, err, code = "", f"timed out after {opts.timeout} s", -1
            row = dict(model=model, trainer=trainer)
            result = [line for line in out.splitlines() if line.startswith("RESULT ")]
            if code == 0 and result:
                row.update(json.loads(result[-1][len("RESULT ") :]))
            else:
                row["error"] = "OOM" if _oom(err) else "failed"
                row["stderr_tail"] = err[-2000:]
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("steps", "stderr_tail")}
            tqdm.write(json.dumps(shown))
    memory, _ = _memory_key(rows)
    # each against TRL's HF-generate row; the vLLM ones against TRL's vLLM row too
    pairs = [(t, "trl") for t in ("fastrl", "trl-patched", *VLLM_TRAINERS)]
    pairs += [("fastrl+vllm", "trl+vllm"), ("trl-patched+vllm", "trl+vllm")]
    for model, (ours_name, base) in itertools.product(models, pairs):
        ours, trl = _row(rows, model, ours_name), _row(rows, model, base)
        suffix = "" if base == "trl" else "_vllm"
        if ours.get(memory) and trl.get(memory):
            ours[f"memory_vs_trl{suffix}"] = ours[memory] / trl[memory]
        if ours.get("tokens_per_second") and trl.get("tokens_per_second"):
            ours[f"speed_vs_trl{suffix}"] = ours["tokens_per_second"] / trl["tokens_per_second"]
    for model in models:  # the issue-12 target: fastrl+vllm against fastrl's HF-generate path
        ours, hf = _row(rows, model, "fastrl+vllm"), _row(rows, model, "fastrl")
        if ours.get("tokens_per_second") and hf.get("tokens_per_second"):
            ours["speed_vs_fastrl"] = ours["tokens_per_second"] / hf["tokens_per_second"]
    config = {k: v for k, v in vars(opts).items() if k not in ("worker", "trainer", "out")}
    results = dict(benchmark="grpo_step", config=config, environment=environment(device),
                   results=rows)  # fmt: skip
    out_path = write_json(
        results, opts.out if opts.out else default_results_path(device, "grpo_step-")
    )
    print(f"wrote {out_path}")
    if not opts.no_plot:
        _plot(results, out_path.with_suffix(".png"))
        print(f"wrote {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
