"""The `fastrl` command.

    fastrl grpo --model DIR --dataset FILE [--reward exact_match --reward format] [options]
    fastrl dpo  --model DIR --dataset FILE [options]
    fastrl rm   --model DIR --dataset FILE [--eval_dataset FILE] [options]
    fastrl kto  --model DIR --dataset FILE [options]
    fastrl ppo  --model DIR --dataset FILE [--reward exact_match] [options]
    fastrl bench {logprobs,policy,preference,grpo_step,ppo_step} [benchmark options]
    fastrl demo [--output_dir runs/demo] [--quick]
    fastrl sample --model DIR --adapter DIR [prompts]
    fastrl --version

`grpo`, `dpo`, `kto` and `ppo` take every field of `GRPOConfig` / `DPOConfig` / `KTOConfig` /
`PPOConfig` (transformers' `TrainingArguments` plus the TRL-named loss options) as flags, or
from a YAML file with `--config FILE` (flags given on the command line win). `fastrl grpo
--help` lists them. A mistake in the options, paths or data prints one line and exits 2;
`--debug` (or `FASTRL_DEBUG=1`) shows the traceback.
"""

import argparse
import ast
import contextlib
import copy
import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import runpy
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

BENCHES = ("logprobs", "policy", "preference", "grpo_step", "ppo_step")
BUILTIN_REWARDS = ("exact_match", "digit_match", "format", "length")
#: the built-in rewards that read the reference answer from `--answer_column`
ANSWER_REWARDS = ("exact_match", "digit_match")
#: files one of which a checkpoint's tokenizer needs (tokenizer_config.json alone loads an
#: empty tokenizer, which fails only at the first step)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")  # fmt: skip


class UsageError(Exception):
    """A mistake in the command line, a path or a data file: reported in one line, exit 2.
    `hint`, where given, is printed on a second line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass
class GRPOScriptArguments:
    model: str = field(metadata={"help": "local checkpoint directory (or hub id)"})
    dataset: str = field(metadata={"help": "JSONL/CSV/parquet file or saved dataset dir"})
    reward: list[str] = field(
        default_factory=lambda: ["exact_match"],
        metadata={
            "help": f"built-in {BUILTIN_REWARDS}, 'module:function' (the current directory "
            "is searched first), 'path/to/file.py:function' or 'reward_model:DIR' (a reward "
            "model `fastrl rm` saved); repeatable"
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


@dataclass
class KTOScriptArguments:
    model: str = field(metadata={"help": "local checkpoint directory (or hub id)"})
    dataset: str = field(
        metadata={"help": "prompt/completion/label (or prompt/chosen/rejected) data file"}
    )


@dataclass
class RMScriptArguments:
    model: str = field(metadata={"help": "local checkpoint directory (or hub id)"})
    dataset: str = field(metadata={"help": "chosen/rejected (+prompt, margin) JSONL/CSV/parquet"})
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "held-out pairs: eval_accuracy is logged on them (once at the end "
            "unless --eval_strategy sets when)"
        },
    )


#: the config class of each training command and the file (in fastrl/trainers) declaring it
CONFIGS = {
    "grpo": ("GRPOConfig", "grpo_config.py"),
    "dpo": ("DPOConfig", "dpo_config.py"),
    "rm": ("RewardConfig", "reward_config.py"),
    "kto": ("KTOConfig", "kto_config.py"),
    "ppo": ("PPOConfig", "ppo_config.py"),
}


class _CollectRepeated(argparse._StoreAction):
    """A list option given several times keeps every value (`--reward a --reward b` is
    `--reward a b`); argparse would keep only the last occurrence."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(self, "_given", False)
        previous = list(getattr(namespace, self.dest) or []) if given else []
        setattr(namespace, self.dest, previous + list(values))
        self._given = True


class _Parser(argparse.ArgumentParser):
    """An argument error in one line (plus where to look), not argparse's usage message,
    which for a few hundred `TrainingArguments` flags runs to a hundred lines."""

    def error(self, message: str):
        hint = f"see `{self.prog} --help`"
        if message.startswith("unrecognized arguments:"):
            flags = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a[:2] == "--"]
            command = self.prog.split()[-1]
            hint = _did_you_mean(flags[0] if flags else "", self._option_string_actions, hint,
                                 command)  # fmt: skip
        raise UsageError(message, hint=hint)


#: options of another command a user may carry over, and what this command has instead
FOREIGN_OPTIONS = {
    "ppo": {
        "num_generations": "PPO samples one completion per prompt (the value head is its "
        "baseline, not a group): a rollout is --per_device_train_batch_size x "
        "--gradient_accumulation_steps x --num_mini_batches prompts",
        "beta": "PPO's KL coefficient is --kl_coef",
    },
    "grpo": {"kl_coef": "GRPO's KL coefficient is --beta"},
}


def _did_you_mean(flag: str, known, otherwise: str, command: str = "") -> str:
    """A hint naming the option closest to the mistyped `flag` (`--num_generation`), or
    what `command` has instead of another command's option (`FOREIGN_OPTIONS`)."""
    name = flag.lstrip("-").replace("-", "_")
    foreign = FOREIGN_OPTIONS.get(command, {}).get(name)
    if foreign:
        return foreign
    close = difflib.get_close_matches(name, sorted(k.lstrip("-") for k in known), n=1)
    return f"did you mean --{close[0]}?" if close else otherwise


def _choices(command: str) -> dict[str, tuple[str, ...]]:
    """Choices for string options the configs check only in `__post_init__`: argparse then
    rejects a typo at once and `--help` shows them (`--loss_type {grpo,...}`)."""
    if command == "rm":
        return {}
    if command == "grpo":
        from fastrl.options import advantages, policy

        return {"loss_type": policy.LOSS_TYPES, "scale_rewards": advantages.SCALES,
                "importance_sampling_level": policy.LEVELS,
                "kl_estimator": policy.KL_ESTIMATORS}  # fmt: skip
    if command == "kto":
        from fastrl.options.preference import KTO_LOSS_TYPES

        return {"loss_type": KTO_LOSS_TYPES}
    if command == "ppo":  # PPOConfig's KL_ESTIMATORS and STOP_TOKENS
        return {"kl_estimator": ("k1", "k3"), "stop_token": ("eos",)}
    from fastrl.options.preference import LOSS_TYPES

    return {"loss_type": LOSS_TYPES}


def _build_parser(command: str, dataclasses):
    """HfArgumentParser over `dataclasses` (the script's arguments, then the config), with
    fastrl's own options first and the inherited `TrainingArguments` after, prefix
    matching off (`--num_generation` is not `--num_generations`)."""
    import dataclasses as dc
    import typing

    from transformers import HfArgumentParser, TrainingArguments

    class Parser(_Parser, HfArgumentParser):
        pass

    parser = Parser(
        prog=f"fastrl {command}",
        # argparse's own usage would list every flag: a few hundred lines
        usage=f"fastrl {command} --model DIR --dataset FILE [--config FILE.yaml] [options]",
        allow_abbrev=False,
        description=f"fastrl {command}: LoRA {command.upper()} training. Options can also "
        "come from a YAML file with --config FILE (flags given here win). --debug alone "
        "(no value) shows the traceback of an error; --debug VALUE is TrainingArguments'.",
    )
    parser.dataclass_types = list(dataclasses)
    own = parser.add_argument_group("fastrl options")
    own.add_argument("--config", metavar="FILE", help="YAML file of option: value")
    inherited = parser.add_argument_group("transformers TrainingArguments")
    base_fields = {f.name for f in dc.fields(TrainingArguments)}
    choices = _choices(command)
    later = []
    for dtype in dataclasses:
        hints = typing.get_type_hints(dtype)
        for f in dc.fields(dtype):
            if not f.init:
                continue
            f.type = hints[f.name]
            if f.name in choices and "choices" not in f.metadata:
                f = copy.copy(f)  # the class's own field keeps its metadata
                f.metadata = types.MappingProxyType({**f.metadata, "choices": choices[f.name]})
            # a config field that only changes a TrainingArguments default stays with them
            if f.name in base_fields:
                later.append(f)
            else:
                parser._parse_dataclass_field(own, f)
    for f in later:
        parser._parse_dataclass_field(inherited, f)
    for action in parser._actions:
        if action.nargs in ("+", "*") and type(action) is argparse._StoreAction:
            action.__class__ = _CollectRepeated
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            # HfArgumentParser gives the `--no_X` of a bool field X's own help text
            action.help = f"Set --{action.dest} to False."
    _save_option_table(command, parser)
    return parser


def _option_cache(command: str) -> Path:
    """Where the option table of `fastrl COMMAND` is kept, keyed by the versions and files
    that define the options: a later mistyped flag is then rejected without importing the
    trainers (seconds of torch, transformers and peft)."""
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parent
    key = [command]
    for package in ("fastrl", "transformers"):
        try:
            key.append(version(package))
        except PackageNotFoundError:
            key.append("-")
    # every source file of the package: the options are declared across ops and trainers
    for path in sorted(here.rglob("*.py")):
        with contextlib.suppress(OSError):
            stat = path.stat()
            key.append(f"{path.relative_to(here)}:{stat.st_mtime_ns}:{stat.st_size}")
    digest = hashlib.sha1("|".join(key).encode()).hexdigest()[:16]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fastrl" / f"cli-{command}-{digest}.json"


def _save_option_table(command: str, parser) -> None:
    table = [
        {"options": list(a.option_strings), "dest": a.dest,
         "nargs": 0 if a.nargs == 0 else a.nargs,
         "choices": None if a.choices is None else [str(c) for c in a.choices]}
        for a in parser._actions if a.option_strings and a.dest != "help"
    ]  # fmt: skip
    path = _option_cache(command)
    with contextlib.suppress(OSError):  # a read-only home only loses the speed-up
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(path)


def _fast_argument_check(command: str, argv: list[str]) -> None:
    """Reject unknown options and bad choices before the slow imports: from the cached
    option table where a run has left one, else from the option names the configs declare
    in their source (read without importing them). The full parser checks everything again
    (types, the config's own checks)."""
    try:
        table = json.loads(_option_cache(command).read_text())
    except (OSError, ValueError):
        _check_option_names(command, argv)
        return
    parser = _Parser(prog=f"fastrl {command}", allow_abbrev=False, add_help=False)
    for entry in table:
        if entry["nargs"] == 0:
            parser.add_argument(*entry["options"], dest=entry["dest"], action="store_const",
                                const=None)  # fmt: skip
        else:
            parser.add_argument(*entry["options"], dest=entry["dest"], nargs=entry["nargs"],
                                choices=entry["choices"])  # fmt: skip
    parser.parse_args(argv)


def _field_statements(path: Path, class_name: str) -> list[ast.AnnAssign]:
    """The field statements of class `class_name` in the file `path`: those of its bases
    that are fastrl classes (defined in that file or imported into it from a ``fastrl``
    module), first base last, then its own (a later one overrides an earlier one's
    default)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next((n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name),
               None)  # fmt: skip
    if cls is None:
        raise LookupError(f"no class {class_name} in {path}")
    imported = {a.asname or a.name: node.module for node in tree.body
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastrl.")
                for a in node.names}  # fmt: skip
    package = Path(__file__).resolve().parent.parent  # the folder holding fastrl/
    statements = []
    for base in reversed(cls.bases):
        if not isinstance(base, ast.Name):
            continue
        if base.id in imported:
            base_path = package.joinpath(*imported[base.id].split(".")).with_suffix(".py")
            statements += _field_statements(base_path, base.id)
        elif any(isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body):
            statements += _field_statements(path, base.id)
    own = [s for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return statements + own


def _declared_fields(path: Path, class_name: str) -> set[str]:
    """The field names class `class_name` in the file `path` declares in its own body or
    gets from its fastrl bases (`_field_statements`)."""
    return {s.target.id for s in _field_statements(path, class_name)}


def _option_names(command: str) -> set[str] | None:
    """Every option `fastrl COMMAND` takes, from the sources of its dataclasses and of
    transformers' `TrainingArguments` (a few ms, where importing them takes seconds);
    None where a source cannot be read (the full parser then is the only check)."""
    import dataclasses as dc

    here = Path(__file__).resolve().parent
    config, config_file = CONFIGS[command]
    script = {"grpo": GRPOScriptArguments, "dpo": DPOScriptArguments, "rm": RMScriptArguments,
              "kto": KTOScriptArguments, "ppo": GRPOScriptArguments}[command]  # fmt: skip
    spec = importlib.util.find_spec("transformers")  # finds it without importing it
    if spec is None or spec.origin is None:
        return None
    sources = [(here / "trainers" / config_file, config),
               (here / "trainers" / "model.py", "ModelArguments"),
               (Path(spec.origin).parent / "training_args.py", "TrainingArguments")]  # fmt: skip
    try:
        names = set().union(*(_declared_fields(path, cls) for path, cls in sources))
    except (OSError, SyntaxError, LookupError):
        return None
    return names | {f.name for f in dc.fields(script)} | {"config"}


def _check_option_names(command: str, argv: list[str]) -> None:
    names = _option_names(command)
    if names is None:
        return
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("--"):
            continue
        flag = arg[2:].split("=", 1)[0]
        name = flag.replace("-", "_")
        if name in names or (name.startswith("no_") and name[3:] in names):
            continue
        raise UsageError(
            f"unrecognized arguments: --{flag}",
            hint=_did_you_mean(flag, names, f"see `fastrl {command} --help`", command),
        )


def _yaml_config(path: str) -> dict:
    """The options in a `--config` YAML file; a missing or malformed file names the file
    and the line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found") from None
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    try:
        options = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"--config {path}{where}: not valid YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(options, dict):
        raise UsageError(f"--config {path}: expected a mapping of option: value")
    return options


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise UsageError("argument --config: expected one argument (a YAML file)")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _parse(dataclasses, argv, command: str = "grpo"):
    """The dataclasses from `argv`, with `--config FILE.yaml` as defaults."""
    parser = _build_parser(command, dataclasses)
    path = _config_path(argv)
    if path is not None:
        defaults = _yaml_config(path)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise UsageError(f"--config {path}: unknown options {unknown}")
        parser.set_defaults(**defaults)
        for action in parser._actions:  # a value from the file satisfies a required flag
            if action.dest in defaults:
                action.required = False
    namespace = parser.parse_args(argv)
    namespace.__dict__.pop("config", None)
    outputs = []
    for dtype in parser.dataclass_types:
        import dataclasses as dc

        names = {f.name for f in dc.fields(dtype) if f.init}
        outputs.append(dtype(**{k: v for k, v in vars(namespace).items() if k in names}))
    return tuple(outputs)


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
        else:
            _check_reward_spec(spec)
            if spec.startswith("reward_model:"):  # a directory `fastrl rm` wrote
                try:
                    funcs.append(rewards.RewardModel(spec.split(":", 1)[1]))
                except ValueError as e:
                    raise UsageError(f"--reward {spec!r}: {e}") from None
            else:
                funcs.append(load_reward_function(spec))
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


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _in_hub_cache(model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def check_model_path(model: str, flag: str = "--model") -> None:
    """Fail at once, naming `flag` and the path, where `model` cannot load: a local path
    that is not a directory (anything but an `org/name` id is taken as one: no ~1 min wait
    for the Hub to say `my-checkpoint` is not there), a directory that is not a checkpoint
    or has no tokenizer files, or, offline (`HF_HUB_OFFLINE=1`), a hub id not in the cache.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{flag} {model}: directory {str(path.resolve())!r} is not a model checkpoint "
                "(no config.json)"
            )
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise UsageError(
                f"{flag} {model}: checkpoint {str(path.resolve())!r} has no tokenizer files "
                f"(one of {', '.join(TOKENIZER_FILES)})",
                hint="save the tokenizer next to the weights: tokenizer.save_pretrained(DIR)",
            )
        return
    if path.exists():
        raise UsageError(f"{flag} {model}: not a directory (a checkpoint is a directory)")
    if not _HUB_ID.match(model) or model.startswith("."):
        if re.fullmatch(r"[\w.-]+", model) and _in_hub_cache(model):
            return  # a bare legacy hub id (gpt2) already downloaded
        raise UsageError(
            f"{flag} {model}: directory {str(path.resolve())!r} does not exist",
            hint="give a local checkpoint directory or a hub id (org/name)",
        )
    if _in_hub_cache(model):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UsageError(
            f"{flag} {model}: no such directory, and hub model {model!r} is not in the "
            "cache (HF_HUB_OFFLINE is set)"
        )
    _check_hub_model(model, flag)


def _check_hub_model(model: str, flag: str) -> None:
    """One request to the Hub for a model that is neither here nor cached: a missing repo
    or an unreachable Hub is said at once, not after transformers' minute of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except GatedRepoError:
        return  # it exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise UsageError(
            f"{flag} {model}: no such directory, and no model {model!r} on the Hub",
            hint="a private or gated model needs `hf auth login` (or HF_TOKEN)",
        ) from None
    except Exception as e:  # the HTTP client's connection errors have no common base here
        if not any(k in type(e).__name__ for k in ("Connect", "Timeout", "Network", "Transport")):
            raise
        raise UsageError(
            f"{flag} {model}: no such directory, not in the Hub cache, and the Hub cannot "
            f"be reached ({type(e).__name__}: {e})",
            hint="give a local checkpoint directory, or download the model first",
        ) from None


def _check_dataset(path: str, needed: dict[str, str], alternatives=(), flag="--dataset") -> None:
    """The data file `path` (given as `flag`) loads and has the columns in `needed` (column
    -> what needs it, naming the flag that changes it), or one of the column sets in
    `alternatives`."""
    # fastrl.trainers loads its trainers lazily: this imports no transformers or peft
    from fastrl.trainers.data import check_data_file

    try:
        columns = check_data_file(path)
    except ValueError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    if columns is None:  # parquet or a saved dataset: checked when loaded
        return
    if any(set(alt) <= set(columns) for alt in alternatives):
        return
    for column, why in needed.items():
        if column not in columns:
            raise UsageError(f"{flag} {path}: no column {column!r} ({why}); the file has {columns}")


def _loss_options(command: str):
    """The options dataclass of `command`'s loss (torch-free); None for `rm` and `ppo`,
    whose number options `_check_config_numbers` checks instead."""
    if command in ("rm", "ppo"):
        return None
    if command == "grpo":
        from fastrl.options.policy import PolicyLossOptions

        return PolicyLossOptions
    if command == "kto":
        from fastrl.options.preference import KTOLossOptions

        return KTOLossOptions
    from fastrl.options.preference import PreferenceLossOptions

    return PreferenceLossOptions


def _prescan(command: str, dataclass, argv: list[str]) -> dict:
    """The script options (model, dataset, rewards) and the loss options from the command
    line and `--config`, read without transformers, so a wrong path, file or value fails
    before the slow imports. Values from the command line are strings here."""
    import dataclasses as dc
    import typing

    parser = _Parser(prog=f"fastrl {command}", allow_abbrev=False, add_help=False)
    for f in dc.fields(dataclass):
        parser.add_argument(f"--{f.name}", nargs="+" if f.name == "reward" else None,
                            action="extend" if f.name == "reward" else "store")  # fmt: skip
    from fastrl.trainers.options import TRAINING_OPTIONS  # torch-free

    early = dict.fromkeys(("output_dir", "max_memory_gb", "resume_from_checkpoint",
                           *TRAINING_OPTIONS, *_number_rules(command)))  # fmt: skip
    for name in early:
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name)
    known = {f.name for f in dc.fields(dataclass)} | set(early)
    declared = _option_names(command) or set()  # the loss options the config has as flags
    loss_options = _loss_options(command)
    hints = {} if loss_options is None else typing.get_type_hints(loss_options)
    for name, hint in hints.items():
        if name in known or name not in declared:
            continue
        flags = {f"--{name}", f"--{name.replace('_', '-')}"}
        kind = _kind(hint)
        nargs = {"list": "+", "bool": "?"}.get(kind)
        parser.add_argument(*sorted(flags), dest=name, nargs=nargs,
                            const="true" if kind == "bool" else None)  # fmt: skip
    given, _ = parser.parse_known_args(argv)
    path = _config_path(argv)
    options = _yaml_config(path) if path is not None else {}
    options.update({k: v for k, v in vars(given).items() if v is not None})
    return options


def _base_type(hint):
    """`hint` without its `| None`."""
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _kind(hint) -> str:
    """'list', 'bool', 'int', 'float' or 'str': how a flag of type `hint` parses."""
    import typing

    base = _base_type(hint)
    if typing.get_origin(base) in (list, tuple):
        return "list"
    return {bool: "bool", int: "int", float: "float"}.get(base, "str")


def _typed(value, hint):
    """`value` as `HfArgumentParser` would parse it for a field of type `hint` (a YAML value
    is typed already); ValueError where it would not parse (the full parser says so)."""
    import typing

    if not isinstance(value, (str, list)):
        return value
    kind = _kind(hint)
    if kind == "list":
        element = (typing.get_args(_base_type(hint)) or (str,))[0]
        return [_typed(v, element) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):
        raise ValueError(value)
    if kind == "bool":
        truth = {"true": True, "t": True, "yes": True, "y": True, "1": True,
                 "false": False, "f": False, "no": False, "n": False, "0": False}  # fmt: skip
        if value.lower() not in truth:
            raise ValueError(value)
        return truth[value.lower()]
    return {"int": int, "float": float}.get(kind, str)(value)


def _literal_defaults(command: str) -> dict:
    """The defaults the config class of `command` (or a fastrl base of it) writes as
    literals in its source (`max_completion_length: int = 512`); the others come from the
    options dataclasses, so the options' own defaults stand for them."""
    here = Path(__file__).resolve().parent
    config, config_file = CONFIGS[command]
    path = here / "trainers" / config_file
    defaults = {}
    for stmt in _field_statements(path, config):
        value = stmt.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
            value = next((k.value for k in value.keywords if k.arg == "default"), None)
        if value is None:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            defaults[stmt.target.id] = ast.literal_eval(value)
    return defaults


def _check_loss_values(command: str, options: dict) -> None:
    """The loss options' values and combinations, checked as the config checks them (the
    same functions, the same messages) before the slow imports."""
    import typing

    from fastrl.trainers import options as checks

    if _loss_options(command) is None:
        return
    hints = typing.get_type_hints(_loss_options(command))
    try:
        given = {k: _typed(v, hints[k]) for k, v in options.items() if k in hints}
    except (ValueError, TypeError):
        return  # a value that does not parse: the full parser names it
    defaults = _literal_defaults(command)
    values = {**defaults, **given}
    if command == "grpo":
        checks.check_policy_loss_options(values)
    elif command == "kto":
        from fastrl.options.preference import KTOLossOptions

        KTOLossOptions(**{k: v for k, v in values.items() if k in hints}).validate()
    else:
        if isinstance(values.get("loss_type"), str):
            values["loss_type"] = [values["loss_type"]]
        # None allowed where the config's default is None: a literal there, else the
        # options' own default (the config reads its non-literal defaults from them)
        unset = _loss_options(command)()
        optional = {name for name in hints if defaults.get(name, getattr(unset, name)) is None}
        checks.check_preference_loss_options(values, optional)


def _check_reward_columns(command: str, options: dict) -> dict[str, str]:
    needed = {"prompt": f"every {command.upper()} dataset needs the prompts"}
    rewards = options.get("reward") or ["exact_match"]
    if isinstance(rewards, str):
        rewards = [rewards]
    answer = options.get("answer_column", "answer")
    for spec in rewards:
        if spec in ANSWER_REWARDS:
            needed.setdefault(answer, f"--reward {spec} reads the answers from it; set "
                                      "--answer_column to the column that has them")  # fmt: skip
    return needed


def _check_training_values(options: dict) -> None:
    """The inherited options every trainer checks alike (`check_training_options`, the
    configs' own function), on the values given; one that does not parse is left to the
    full parser, which names it."""
    from fastrl.trainers.options import TRAINING_OPTIONS, check_training_options

    values = {}
    for name in TRAINING_OPTIONS:
        if name in options:
            with contextlib.suppress(TypeError, ValueError):
                values[name] = float(options[name])
    check_training_options(values)


def _number_rules(command: str) -> dict[str, dict]:
    """The number options the config of `command` checks with `check_numbers` (its own
    table, where it has one, and `ModelArguments`'), name -> bounds."""
    from fastrl.trainers.options import CONFIG_NUMBERS, MODEL_NUMBERS  # torch-free

    return {**CONFIG_NUMBERS.get(command, {}), **MODEL_NUMBERS}


def _check_config_numbers(command: str, options: dict) -> None:
    """The number options given (`_number_rules`), checked by the configs' own function
    and table; a value that does not parse is left to the full parser, which names it."""
    from fastrl.trainers.options import check_numbers

    rules = _number_rules(command)
    values = {}
    for name, bounds in rules.items():
        value = options.get(name)
        if isinstance(value, str):  # from the command line; YAML values are typed
            if value == "None" and bounds.get("optional"):
                continue
            try:
                value = int(value) if bounds.get("integer") else float(value)
            except ValueError:
                continue
        if name in options:
            values[name] = value
    check_numbers(values, rules)


def _check_output_paths(options: dict) -> None:
    """`--output_dir` is a directory or is not there yet; `--resume_from_checkpoint` is a
    directory (the checkpoints `--output_dir` holds are named where it is not)."""
    output_dir = options.get("output_dir")
    output_dir = output_dir if isinstance(output_dir, str) else None
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UsageError(
            f"--output_dir {output_dir}: is a file; the output directory must be a directory "
            "or not exist yet"
        )
    resume = options.get("resume_from_checkpoint")
    if not isinstance(resume, str) or Path(resume).is_dir():  # None, or YAML's `true`
        return
    where = Path(output_dir if output_dir is not None else "trainer_output")
    found = sorted(
        (p.name for p in where.glob("checkpoint-*") if p.is_dir()),
        key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1,
    )
    hint = (f"--output_dir {where} has {', '.join(found)}" if found else
            f"--output_dir {where} has no checkpoint-* directories")  # fmt: skip
    raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint directory",
                     hint=hint)  # fmt: skip


def _check_reward_spec(spec: str) -> None:
    """What can be checked of one `--reward` spec without importing it: a built-in's name,
    a reward model directory that is one (`check_reward_model_dir`), a `file.py` that is
    there."""
    if spec in BUILTIN_REWARDS:
        return
    if spec.startswith("reward_model:"):
        from fastrl.trainers.rewards import check_reward_model_dir

        path = spec.split(":", 1)[1]
        if not Path(path).is_dir():
            raise UsageError(f"--reward {spec!r}: reward model directory {path!r} not found")
        try:
            check_reward_model_dir(path)
        except ValueError as e:
            raise UsageError(f"--reward {spec!r}: {e}") from None
        return
    if ":" not in spec:
        raise UsageError(
            f"--reward {spec!r}: use one of {BUILTIN_REWARDS}, 'module:function', "
            "'path/to/file.py:function' or 'reward_model:DIR'"
        )
    target, _, name = spec.rpartition(":")
    if target and name and (target.endswith(".py") or os.sep in target or "/" in target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():  # the message load_reward_function gives
            raise ValueError(f"--reward {spec!r}: file {str(path)!r} not found")


def _check_reward_specs(options: dict) -> None:
    rewards = options.get("reward") or []
    for spec in [rewards] if isinstance(rewards, str) else rewards:
        _check_reward_spec(str(spec))


def _prechecks(command: str, dataclass, argv: list[str]) -> dict:
    options = _prescan(command, dataclass, argv)
    _check_loss_values(command, options)  # first: one message, cached option table or not
    _fast_argument_check(command, argv)
    missing = [f"--{name}" for name in ("model", "dataset") if name not in options]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}",
                         hint=f"see `fastrl {command} --help`")  # fmt: skip
    _check_training_values(options)
    _check_config_numbers(command, options)
    _check_output_paths(options)
    check_model_path(str(options["model"]))
    if command in ("grpo", "ppo"):
        _check_reward_specs(options)
        _check_dataset(str(options["dataset"]), _check_reward_columns(command, options))
    elif command == "rm":
        from fastrl.trainers.data import REWARD_COLUMNS, REWARD_TOKEN_COLUMNS

        needed = {c: "reward pairs need chosen and rejected" for c in REWARD_COLUMNS}
        for name in ("dataset", "eval_dataset"):
            if options.get(name) is not None:
                _check_dataset(str(options[name]), needed, (REWARD_TOKEN_COLUMNS,), f"--{name}")
    elif command == "kto":
        needed = {c: "KTO data needs prompt, completion and label (or prompt, chosen and "
                  "rejected pairs)" for c in ("prompt", "completion", "label")}  # fmt: skip
        paired = ("prompt", "chosen", "rejected")
        tokens = ("prompt_ids", "completion_ids", "label")
        _check_dataset(str(options["dataset"]), needed, alternatives=(paired, tokens))
    else:
        from fastrl.trainers.data import PREFERENCE_COLUMNS, PREFERENCE_TOKEN_COLUMNS

        needed = {c: "DPO pairs need prompt, chosen and rejected" for c in PREFERENCE_COLUMNS}
        _check_dataset(str(options["dataset"]), needed, alternatives=(PREFERENCE_TOKEN_COLUMNS,))
    return options


def _announce(command: str, options: dict, config) -> None:
    """Say what a user may not expect: the default output directory, a memory cap that does
    nothing without CUDA."""
    if "output_dir" not in options:
        print(f"fastrl {command}: no --output_dir given: writing to "
              f"{os.path.abspath(config.output_dir)}", file=sys.stderr)  # fmt: skip
    if config.max_memory_gb is not None:
        import torch

        if not torch.cuda.is_available():
            print(f"fastrl {command}: warning: --max_memory_gb {config.max_memory_gb} has no "
                  "effect: no CUDA device", file=sys.stderr)  # fmt: skip
        # said once here, in the user's terms; the trainer's own warning would repeat it
        warnings.filterwarnings("ignore", message="max_memory_gb=")


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


class _Running:
    """Set while the work runs (training, a benchmark): a ValueError from there is a bug or
    a failure of the run, not a mistake in what the user typed, and keeps its traceback."""

    active = False


def _train_and_save(trainer) -> None:
    _Running.active = True
    try:
        trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
        trainer.save_model(trainer.args.output_dir)
        trainer.save_state()  # trainer_state.json: the logs, next to the adapter
    finally:
        close = getattr(trainer, "close_vllm", None)  # a vLLM engine, when GRPO has one
        if close is not None:
            close()


def cmd_grpo(argv: list[str]) -> None:
    options = {} if _wants_help(argv) else _prechecks("grpo", GRPOScriptArguments, argv)
    from fastrl.trainers import GRPOConfig, GRPOTrainer

    script, config = _parse((GRPOScriptArguments, GRPOConfig), argv, "grpo")
    rewards = _reward_functions(script)
    _announce("grpo", options, config)
    _train_and_save(
        GRPOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,  # the trainers load paths with load_data
            reward_funcs=rewards,
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_dpo(argv: list[str]) -> None:
    options = {} if _wants_help(argv) else _prechecks("dpo", DPOScriptArguments, argv)
    from fastrl.trainers import DPOConfig, DPOTrainer

    script, config = _parse((DPOScriptArguments, DPOConfig), argv, "dpo")
    _announce("dpo", options, config)
    _train_and_save(
        DPOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_rm(argv: list[str]) -> None:
    options = {} if _wants_help(argv) else _prechecks("rm", RMScriptArguments, argv)
    from fastrl.trainers import RewardConfig, RewardTrainer

    script, config = _parse((RMScriptArguments, RewardConfig), argv, "rm")
    _announce("rm", options, config)
    trainer = RewardTrainer(
        model=script.model,
        args=config,
        train_dataset=script.dataset,
        eval_dataset=script.eval_dataset,
        processing_class=_tokenizer(script.model),
    )
    _train_and_save(trainer)
    if script.eval_dataset is not None and config.eval_strategy == "no":
        # an eval set given without an evaluation schedule: its accuracy once, at the end
        trainer.evaluate()
        trainer.save_state()


def cmd_kto(argv: list[str]) -> None:
    options = {} if _wants_help(argv) else _prechecks("kto", KTOScriptArguments, argv)
    from fastrl.trainers import KTOConfig, KTOTrainer

    script, config = _parse((KTOScriptArguments, KTOConfig), argv, "kto")
    _announce("kto", options, config)
    _train_and_save(
        KTOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_ppo(argv: list[str]) -> None:
    options = {} if _wants_help(argv) else _prechecks("ppo", GRPOScriptArguments, argv)
    from fastrl.trainers import PPOConfig, PPOTrainer

    script, config = _parse((GRPOScriptArguments, PPOConfig), argv, "ppo")
    rewards = _reward_functions(script)
    _announce("ppo", options, config)
    _train_and_save(
        PPOTrainer(
            model=script.model,
            args=config,
            train_dataset=script.dataset,
            reward_funcs=rewards,
            processing_class=_tokenizer(script.model),
        )
    )


def cmd_sample(argv: list[str]) -> int:
    try:
        from fastrl.sample import main as sample_main
    except ModuleNotFoundError as e:
        if e.name != "fastrl.sample":
            raise
        raise UsageError("`fastrl sample` is not available in this install") from None
    return sample_main(argv)


def cmd_bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise UsageError(f"usage: fastrl bench {{{','.join(BENCHES)}}} [options]")
    script = Path(__file__).resolve().parent.parent / "bench" / f"bench_{argv[0]}.py"
    if not script.exists():
        raise UsageError(f"{script} not found: the benchmarks run from a source checkout")
    sys.argv = [str(script), *argv[1:]]
    _Running.active = True
    runpy.run_path(str(script), run_name="__main__")


def cmd_demo(argv: list[str]) -> None:
    import argparse

    from fastrl.demo.run import run_demo

    parser = argparse.ArgumentParser(prog="fastrl demo", description=run_demo.__doc__)
    parser.add_argument("--output_dir", "--output-dir", default="runs/demo")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    _Running.active = True
    run_demo(args.output_dir, quick=args.quick, seed=args.seed, threads=args.threads)


COMMANDS = {"grpo": cmd_grpo, "dpo": cmd_dpo, "rm": cmd_rm, "kto": cmd_kto, "ppo": cmd_ppo,
            "sample": cmd_sample, "bench": cmd_bench, "demo": cmd_demo}  # fmt: skip

#: what a user's mistake raises: one line, exit 2, no traceback (unless --debug)
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastrl")
    except PackageNotFoundError:  # a source checkout on sys.path, not installed
        from fastrl import __version__

        return __version__


def _help() -> str:
    return (
        f"{__doc__.strip()}\n\n"
        "`fastrl grpo --help` (dpo, demo, sample, ...) lists a command's options."
    )


def _negative_value_hint(message: str, argv: list[str]) -> str | None:
    """argparse reads a value such as `-1e-5` as an option, and says the flag before it
    expected one argument: the hint says how to write it."""
    head = message.split(": expected one argument", 1)
    if len(head) != 2 or not head[0].startswith("argument "):
        return None
    names = set(head[0][len("argument ") :].split("/"))
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag in names and value.startswith("-"):
            with contextlib.suppress(ValueError):
                float(value)
                return f"write {flag}={value} (a value that starts with '-' reads as an option)"
    return None


def _one_line_warnings(command: str, show):
    """A `warnings.showwarning` that prints fastrl's own `UserWarning`s (raised in the
    package) as `fastrl CMD: warning: ...`, without the source line Python adds; other
    warnings go to `show`."""
    package = Path(__file__).resolve().parent

    def showwarning(message, category, filename, lineno, file=None, line=None):
        with contextlib.suppress(OSError, ValueError):
            if category is UserWarning and Path(filename).resolve().is_relative_to(package):
                print(f"fastrl {command}: warning: {message}", file=file or sys.stderr)
                return
        show(message, category, filename, lineno, file, line)

    return showwarning


def _cpu_accelerator_notice(record) -> bool:
    return not record.getMessage().startswith("Setting accelerator to CPU")


def _quiet_deepspeed_on_cpu() -> None:
    """On a machine without NVIDIA GPUs, drop the warning DeepSpeed logs when it is imported
    (transformers and accelerate import it where it is installed): "Setting accelerator to
    CPU ..." is what a CPU run expects, and it would stand on every command's stdout."""
    import logging
    import shutil

    if shutil.which("nvidia-smi") is None:
        logger = logging.getLogger("DeepSpeed")
        if _cpu_accelerator_notice not in logger.filters:
            logger.addFilter(_cpu_accelerator_notice)


def main(argv: list[str] | None = None) -> int:
    """The `fastrl` command. A user error prints `fastrl CMD: error: ...` (and a hint) to
    stderr and exits 2; `--debug` or `FASTRL_DEBUG=1` re-raises it with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _Running.active = False  # main() may run several times in one process (tests)
    debug = os.environ.get("FASTRL_DEBUG", "") not in ("", "0")
    # `--debug` alone is fastrl's; `--debug VALUE` is TrainingArguments' own `debug` option
    for i in reversed(range(len(argv))):
        if argv[i] == "--debug" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            debug = True
            del argv[i]
    if argv and argv[0] == "--version":
        print(f"fastrl {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        if not argv:
            raise SystemExit(2)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastrl: error: unknown command {command!r}; use one of "
              f"{', '.join(COMMANDS)}\nsee `fastrl --help`", file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    _quiet_deepspeed_on_cpu()
    try:
        with warnings.catch_warnings():  # restores the previous showwarning afterwards
            warnings.showwarning = _one_line_warnings(command, warnings.showwarning)
            code = COMMANDS[command](rest)
    except USER_ERRORS as e:
        if debug or _Running.active:
            raise
        print(f"fastrl {command}: error: {e}", file=sys.stderr)
        hint = _negative_value_hint(str(e), rest) or getattr(e, "hint", None)
        print(f"hint: {hint}" if hint else "(run again with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2) from None
    except (OSError, MemoryError, RuntimeError) as e:
        # a runtime failure (unreadable weights, out of memory): exit 1 with the message;
        # other RuntimeErrors are bugs, and keep their traceback
        out_of_memory = isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
        if debug or not (out_of_memory or isinstance(e, OSError)):
            raise
        print(f"fastrl {command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)  # fmt: skip
        if out_of_memory and not getattr(e, "fastrl_advice", False):  # the trainers' say what
            print("hint: lower --per_device_train_batch_size or --max_completion_length",
                  file=sys.stderr)  # fmt: skip
        raise SystemExit(1) from None
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
