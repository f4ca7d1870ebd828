"""`fastrl sample`: load a base model (+ a LoRA adapter) and print completions for prompts.

    fastrl sample --adapter runs/demo/grpo_adapter --prompt '12+7='
    fastrl sample --model ./my-checkpoint --prompts prompts.txt --temperature 0.7

The base model of an adapter is the one its `adapter_config.json` names
(`base_model_name_or_path`); `--model` overrides it. The tokenizer is the adapter's when
it saved one (fastrl's trainers do), else the base model's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class UsageError(Exception):
    """A mistake in the command line or the files it names: printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastrl sample",
        description="Print completions of a model (a base model, or a base + LoRA adapter).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="a LoRA adapter directory (has adapter_config.json)"
    )
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="the base model (default: the one the adapter's adapter_config.json names)",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)"
    )
    parser.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 decodes greedily (default)"
    )
    parser.add_argument("--seed", type=int, default=0, help="for sampling (temperature > 0)")
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template"
    )
    return parser


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise UsageError(f"--prompts {args.prompts}: no such file")
        with open(args.prompts, encoding="utf-8") as f:
            # one prompt a line; blank lines separate nothing and are skipped
            prompts += [line.rstrip("\n") for line in f if line.strip()]
        if not args.prompt and not prompts:
            raise UsageError(f"--prompts {args.prompts}: the file has no prompts")
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def base_model_path(adapter: str) -> str:
    """The base model an adapter directory names in its `adapter_config.json`."""
    config = os.path.join(adapter, "adapter_config.json")
    if not os.path.isdir(adapter):
        raise UsageError(f"--adapter {adapter}: no such directory")
    if not os.path.isfile(config):
        raise UsageError(f"--adapter {adapter}: not an adapter (no adapter_config.json)")
    try:
        with open(config, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config}: cannot be read ({exc})") from None
    if not base:
        raise UsageError(f"{config} names no base model: pass --model DIR")
    return base


def load(args):
    """(model, tokenizer) for the command line's --model/--adapter, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not args.adapter and not args.model:
        raise UsageError("pass --adapter DIR (a LoRA adapter) or --model DIR (a base model)")
    base = args.model or base_model_path(args.adapter)
    local = os.path.isdir(base)
    # a path that is not a directory would go to the Hub as a repo id and fail slowly
    if not local and (base.startswith((".", "/", "~")) or base.count("/") > 1):
        flag = "--model" if args.model else f"the base model of --adapter {args.adapter}:"
        raise UsageError(f"{flag} {base}: no such directory")
    tok_dir = args.adapter
    if not (tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json"))):
        tok_dir = base
    tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=os.path.isdir(tok_dir))
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=local)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float, seed: int,
    *, add_special_tokens: bool = True, batch_size: int = 16,
) -> list[str]:  # fmt: skip
    """Completions (special tokens stripped): greedy at temperature 0, else sampled with
    the global RNG seeded by `seed`; left-padded batches, as a decoder-only model needs."""
    import torch

    device = next(model.parameters()).device
    sample = temperature > 0
    # top_k=0: plain temperature sampling, not the model's generation_config defaults
    options = dict(do_sample=True, temperature=temperature, top_k=0) if sample else {}
    options.setdefault("do_sample", False)
    torch.manual_seed(seed)
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True,
                add_special_tokens=add_special_tokens,
            )  # fmt: skip
            enc = {k: v.to(device) for k, v in enc.items()}
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    **options,
                )  # fmt: skip
            new = ids[:, enc["input_ids"].shape[1] :]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = old_side
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fastrl sample`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    from fastrl.trainers.console import silence_known_warnings

    silence_known_warnings()  # peft's wrapping reads a deprecated transformers property
    try:
        prompts = read_prompts(args)
        if args.adapter:
            base_model_path(args.adapter)  # check the adapter before loading anything
        model, tokenizer = load(args)
        if args.chat and not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: the tokenizer has no chat template")
    except UsageError as exc:
        print(f"fastrl sample: error: {exc}", file=sys.stderr)
        return 2

    texts = prompts
    if args.chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    completions = generate(
        model, tokenizer, texts, args.max_new_tokens, args.temperature, args.seed,
        add_special_tokens=not args.chat,  # a chat template writes its own BOS
    )  # fmt: skip
    for prompt, completion in zip(prompts, completions, strict=True):
        print(f"{prompt}{completion}" if not args.chat else f"{prompt}\n-> {completion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
