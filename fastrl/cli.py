"""The `fastrl` command.

    fastrl grpo --model DIR --dataset FILE [--reward exact_match --reward format] [options]
    fastrl dpo  --model DIR --dataset FILE [options]
    fastrl bench {logprobs,policy,preference,grpo_step} [benchmark options]
    fastrl demo [--output_dir runs/demo] [--quick]

`grpo` and `dpo` take every field of `GRPOConfig` / `DPOConfig` (transformers'
`TrainingArguments` plus the TRL-named loss options) as flags, or from a YAML file with
`--config FILE` (flags given on the command line win).
"""

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import os
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path

BENCHES = ("logprobs", "policy", "preference", "grpo_step")
BUILTIN_REWARDS = ("exact_match", "digit_match", "format", "length")


@dataclass
class GRPOScriptArguments:
    model: str = field(metadata={"help": "local checkpoint directory (or hub id)"})
    dataset: str = field(metadata={"help": "JSONL/CSV/parquet file or saved dataset dir"})
    reward: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={
            "help": f"built-in {BUILTIN_REWARDS}, 'module:function' (the current directory "
            "is searched first) or 'path/to/file.py:function'; repeatable"
        },
    )
    answer_column: str = field(
        default="answer", metadata={"help": "for exact_match and digit_match"}
    )
    answer_pattern: str | None = field(default=None, metadata={"help": "regex, group 1"})
    format_pattern: str = field(default=r"<answer>.*?</answer>", metadata={"help": "for format"})
    length_target: int = field(default=256, metadata={"help": "characters, for length"})


@dataclass
class DPOScriptArguments:
    model: str = field(metadata={"help": "local checkpoint directory (or hub id)"})
    dataset: str = field(metadata={"help": "prompt/chosen/rejected JSONL/CSV/parquet file"})


class _CollectRepeated(argparse._StoreAction):
    """A list option given several times keeps every value (`--reward a --reward b` is
    `--reward a b`); argparse would keep only the last occurrence."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(self, "_given", False)
        previous = list(getattr(namespace, self.dest) or []) if given else []
        setattr(namespace, self.dest, previous + list(values))
        self._given = True


def _parse(dataclasses, argv):
    """HfArgumentParser over `dataclasses`, with `--config FILE.yaml` as defaults."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclasses)
    for action in parser._actions:
        if action.nargs in ("+", "*") and type(action) is argparse._StoreAction:
            action.__class__ = _CollectRepeated
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a YAML file")
        with open(argv[i + 1]) as f:
            defaults = yaml.safe_load(f) or {}
        if not isinstance(defaults, dict):
            raise SystemExit(f"--config {argv[i + 1]}: expected a mapping of option: value")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise SystemExit(f"--config {argv[i + 1]}: unknown options {unknown}")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a value from the file satisfies a required flag
            if action.dest in defaults:
                action.required = False
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(args=argv)


def _reward_functions(script: GRPOScriptArguments):
    from fastrl.trainers import rewards

    funcs = []
    for spec in script.reward:
        if spec in ("exact_match", "digit_match"):
            kw = {} if script.answer_pattern is None else {"pattern": script.answer_pattern}
            factory = {"exact_match": rewards.exact_match_answer,
                       "digit_match": rewards.digit_match_answer}[spec]  # fmt: skip
            funcs.append(factory(answer_column=script.answer_column, **kw))
        elif spec == "format":
            funcs.append(rewards.format_reward(script.format_pattern))
        elif spec == "length":
            funcs.append(rewards.length_penalty(script.length_target))
        elif ":" in spec:
            funcs.append(load_reward_function(spec))
        else:
            raise SystemExit(
                f"--reward {spec!r}: use one of {BUILTIN_REWARDS}, 'module:function' or "
                "'path/to/file.py:function'"
            )
    return funcs


@contextlib.contextmanager
def _on_sys_path(directory: str):
    """`directory` first on `sys.path` for the block, unless it is there already."""
    if directory in sys.path:
        yield
        return
    sys.path.insert(0, directory)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(directory)


def load_reward_function(spec: str):
    """The reward function a user's `--reward` spec names: `module:function`, the module
    imported with the current directory searched first (the `fastrl` console script does
    not put it on `sys.path`), or `path/to/file.py:function`, the file loaded as a module
    (its directory searched first for its own imports). Raises ValueError naming `spec`."""
    target, _, name = spec.rpartition(":")  # rpartition: a Windows path keeps its drive
    if not target or not name:
        raise ValueError(f"--reward {spec!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: file {str(path)!r} not found")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        module_name = f"_fastrl_reward_{path.stem}_{digest}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ValueError(f"--reward {spec!r}: cannot load {str(path)!r} as a module")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # as an import does: pickling, dataclasses
            try:
                with _on_sys_path(str(path.parent)):
                    loader_spec.loader.exec_module(module)
            except BaseException as e:
                del sys.modules[module_name]
                if isinstance(e, ImportError):
                    raise ValueError(f"--reward {spec!r}: importing {str(path)!r}: {e}") from e
                raise
        where = f"file {str(path)!r}"
    else:
        try:
            with _on_sys_path(os.getcwd()):
                module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(
                f"--reward {spec!r}: cannot import module {target!r} (searched the current "
                f"directory {os.getcwd()!r} and sys.path): {e}"
            ) from e
        where = f"module {target!r}"
    func = getattr(module, name, None)
    if func is None:
        raise ValueError(f"--reward {spec!r}: {where} has no function {name!r}")
    if not callable(func):
        raise ValueError(f"--reward {spec!r}: {name!r} in {where} is not callable")
    return func


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path, local_files_only=Path(model_path).is_dir())


def _train_and_save(trainer) -> None:
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model(trainer.args.output_dir)
    trainer.save_state()  # trainer_state.json: the logs, next to the adapter


def cmd_grpo(argv: list[str]) -> None:
    from fastrl.trainers import GRPOConfig, GRPOTrainer

    script, config = _parse((GRPOScriptArguments, GRPOConfig), argv)
    _train_and_save(
        GRPOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,  # the trainers load paths with load_data
            reward_funcs=_reward_functions(script),
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_dpo(argv: list[str]) -> None:
    from fastrl.trainers import DPOConfig, DPOTrainer

    script, config = _parse((DPOScriptArguments, DPOConfig), argv)
    _train_and_save(
        DPOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: fastrl bench {{{','.join(BENCHES)}}} [options]")
    script = Path(__file__).resolve().parent.parent / "bench" / f"bench_{argv[0]}.py"
    if not script.exists():
        raise SystemExit(f"{script} not found: the benchmarks run from a source checkout")
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


def cmd_demo(argv: list[str]) -> None:
    import argparse

    from fastrl.trainers.demo import run_demo

    parser = argparse.ArgumentParser(prog="fastrl demo", description=run_demo.__doc__)
    parser.add_argument("--output_dir", "--output-dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    run_demo(args.output_dir, quick=args.quick, seed=args.seed, threads=args.threads)


COMMANDS = {"grpo": cmd_grpo, "dpo": cmd_dpo, "bench": cmd_bench, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
