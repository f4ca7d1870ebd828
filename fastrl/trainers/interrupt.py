"""Ctrl-C saves a checkpoint, and saved adapters name their base model by an absolute
path: a mixin for the trainers (before `transformers.Trainer` in the bases).

The checkpoint is the one the run would have saved at the end of its last completed
optimizer step: the weights, optimizer and scheduler are untouched by a partial
accumulation (its gradients were never applied), the data position is the step count,
and the RNG is put back to its state at that step's end. Resuming from it continues as
from any checkpoint.
"""

import os
import random
import shlex
import sys

import numpy as np
import torch
from transformers import TrainerCallback


def rng_state() -> dict:
    """The global RNG states `transformers.Trainer` saves in a checkpoint."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global state Trainer saves
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


class _RngAtStepEnd(TrainerCallback):
    """Keeps the RNG state of the end of the last optimizer step (a few KB)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._rng_at_step_end = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._rng_at_step_end = rng_state()


class SaveOnInterrupt:
    """`train()` that saves `checkpoint-<last completed step>` in `output_dir` when
    interrupted by Ctrl-C (KeyboardInterrupt), then lets the interrupt propagate. Nothing
    is saved before the first step, or when that checkpoint exists already."""

    _rng_at_step_end: dict | None = None

    def _track_rng_at_step_end(self) -> None:
        """Call once in `__init__` after `Trainer.__init__`."""
        self.add_callback(_RngAtStepEnd(self))

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise

    def _rewind_to_last_step(self) -> None:
        """Undo what a partial step changed beyond the RNG (subclasses' own state)."""

    def _save_on_interrupt(self) -> None:
        step = self.state.global_step
        folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        if step == 0 or os.path.isdir(folder) or getattr(self, "lr_scheduler", None) is None:
            return
        self._rewind_to_last_step()
        if self._rng_at_step_end is not None:
            set_rng_state(self._rng_at_step_end)
        self._save_checkpoint(self.model_wrapped, trial=None)
        print(f"\nInterrupted: saved {folder}; resume with\n  {resume_command(folder)}")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, with the adapter's `base_model_name_or_path` made absolute
        (a relative local path would not load from another directory); says where a
        final (not checkpoint) save went."""
        absolute_base_model_path(self.model)
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.is_world_process_zero():
            print(f"Saved the adapter to {output_dir or self.args.output_dir}", flush=True)


def absolute_base_model_path(model) -> None:
    """Resolve the base model path each of `model`'s peft configs records, when it is a
    local directory, so `AutoPeftModelForCausalLM.from_pretrained(adapter)` finds it from
    anywhere. Hub ids and paths that do not exist here are left as they are."""
    for config in (getattr(model, "peft_config", None) or {}).values():
        path = getattr(config, "base_model_name_or_path", None)
        if path and not os.path.isabs(path) and os.path.isdir(path):
            config.base_model_name_or_path = os.path.abspath(path)


def resume_command(checkpoint: str, argv: list[str] | None = None) -> str:
    """How to resume from `checkpoint`, in the form the run was started: the `fastrl`
    command line with `--resume_from_checkpoint DIR` (replacing any given), else the
    Python call."""
    argv = sys.argv if argv is None else argv
    # the console script, or `python -m fastrl.cli`
    prog = argv[0] if argv else ""
    via_cli = os.path.basename(prog) == "fastrl" or prog.endswith(os.path.join("fastrl", "cli.py"))
    if not via_cli or len(argv) < 2:
        return f"trainer.train(resume_from_checkpoint={checkpoint!r})"
    if argv[1] not in ("grpo", "dpo"):  # `fastrl demo` has no resume option
        return f"trainer.train(resume_from_checkpoint={checkpoint!r}) (`fastrl {argv[1]}` restarts)"
    args, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--resume_from_checkpoint", "--resume-from-checkpoint"):
            skip = True  # its value follows
            continue
        if a.startswith(("--resume_from_checkpoint=", "--resume-from-checkpoint=")):
            continue
        args.append(a)
    return shlex.join(["fastrl", *args, "--resume_from_checkpoint", checkpoint])
