"""What a person sees on the console while a trainer runs: one compact line per logging
step instead of `transformers`' printed metric dicts, and no known-harmless warnings.

The full metrics still go to `Trainer.log`'s other consumers (`report_to`,
`trainer_state.json`): only the console rendering changes.
"""

from __future__ import annotations

import contextlib
import math
import warnings

from transformers import PrinterCallback, ProgressCallback

# The metrics shown, in this order, when present (the rest stay in report_to /
# trainer_state.json): what tells a person whether the run is learning and how fast.
KEY_METRICS = (
    "loss",
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "rewards/accuracies",
    "rewards/margins",
    "completions/mean_length",
    "grad_norm",
    "learning_rate",
    "tokens_per_second",
    "peak_memory_gib",
)
# short names for the console only
_LABELS = {
    "learning_rate": "lr",
    "rewards/accuracies": "acc",
    "rewards/margins": "margin",
    "completions/mean_length": "len",
    "tokens_per_second": "tok/s",
    "peak_memory_gib": "mem_gib",
    "reward_std": "reward_std",
}


def _fmt(key: str, value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key == "learning_rate":
        return f"{value:.2e}"
    if key in ("tokens_per_second", "num_tokens"):
        return f"{value:.0f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_log_line(logs: dict, step: int, max_steps: int) -> str:
    """One line for a `Trainer.log` call: the step and the key metrics, rounded.

    Training logs show `KEY_METRICS` plus each reward function's mean
    (`rewards/<name>/mean`); evaluation logs (`eval_*`) show every eval metric; the final
    summary `Trainer.train` logs shows its runtime and mean loss.
    """
    head = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    if "train_runtime" in logs:
        parts = [f"{logs['train_runtime']:.1f} s"]
        if "train_loss" in logs:
            parts.append(f"mean loss {_fmt('train_loss', logs['train_loss'])}")
        return f"{head} | done in " + " | ".join(parts)
    evals = {k: v for k, v in logs.items() if k.startswith("eval_") and "runtime" not in k}
    evals = {k: v for k, v in evals.items() if "per_second" not in k}
    if evals:
        return f"{head} | eval | " + " | ".join(f"{k[5:]} {_fmt(k, v)}" for k, v in evals.items())
    keys = [k for k in KEY_METRICS if k in logs]
    # per-reward-function means sit after the summed reward
    per_reward = sorted(k for k in logs if k.startswith("rewards/") and k.endswith("/mean"))
    if "reward" in keys:
        at = keys.index("reward") + 1
        keys[at:at] = per_reward
    else:
        keys += per_reward
    if "epoch" in logs and not keys:
        keys = ["epoch"]
    fields = []
    for k in keys:
        label = _LABELS.get(k, k[len("rewards/") : -len("/mean")] if k in per_reward else k)
        fields.append(f"{label} {_fmt(k, logs[k])}")
    return " | ".join([head, *fields])


class ConsoleCallback(ProgressCallback):
    """`ProgressCallback` (training and evaluation bars) whose log lines are compact: a
    line per logging step written above the bar, from the main process only."""

    def __init__(self, show_bar: bool = True):
        super().__init__()
        self.show_bar = show_bar

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar:
            super().on_train_begin(args, state, control, **kwargs)
        self.current_step = 0

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.show_bar:
            super().on_prediction_step(args, state, control, eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = format_log_line(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)  # above the bar, which stays at the bottom
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)
        if state.is_world_process_zero:
            print(outputs_message(args, state), flush=True)


def silence_known_warnings() -> None:
    """Hide dependency warnings a user can do nothing about (targeted by message and
    module, so every other warning still shows)."""
    # transformers 5 deprecates the property that peft and Trainer still read
    warnings.filterwarnings(
        "ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    # Trainer's default dataloader_pin_memory=True on a machine without an accelerator
    warnings.filterwarnings(
        "ignore",
        message=r".*'pin_memory' argument is set as true but no accelerator is found",
        category=UserWarning,
    )


@contextlib.contextmanager
def no_progress_bars():
    """Hide the progress bars of transformers (weights written) and datasets (a filter)
    for a step that takes a blink and would only clutter the console; they come back
    after, as they were."""
    import datasets
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown[0]:
            hf_logging.enable_progress_bar()
        if shown[1]:
            datasets.enable_progress_bars()


def use_console(trainer) -> None:
    """Swap the trainer's console printing (`ProgressCallback`, or `PrinterCallback`
    with `disable_tqdm`) for `ConsoleCallback`, and silence the known-harmless warnings.
    Call once in the trainer's `__init__`, after `Trainer.__init__`."""
    silence_known_warnings()
    handler = trainer.callback_handler
    had = {type(cb) for cb in handler.callbacks}
    if not had & {ProgressCallback, PrinterCallback}:
        return  # the user replaced them already: leave their choice alone
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleCallback(show_bar=not trainer.args.disable_tqdm))


def outputs_message(args, state) -> str:
    """Where a finished run's outputs are: its checkpoints and its logs (the adapter is
    reported by `save_model`, which runs after training)."""
    import glob
    import os

    out = args.output_dir
    ckpts = sorted(
        glob.glob(os.path.join(out, "checkpoint-*")), key=lambda p: int(p.rsplit("-", 1)[-1])
        if p.rsplit("-", 1)[-1].isdigit() else -1,
    )  # fmt: skip
    lines = [f"Finished {state.global_step} steps. Outputs in {out}:"]
    if ckpts:
        shown = ", ".join(os.path.basename(p) for p in ckpts[-3:])
        more = f" (and {len(ckpts) - 3} more)" if len(ckpts) > 3 else ""
        lines.append(f"  checkpoints: {shown}{more} (each with its trainer_state.json)")
    else:
        strategy = getattr(args.save_strategy, "value", args.save_strategy)  # an enum
        lines.append(f"  checkpoints: none (save_strategy={strategy!r})")
    report_to = [args.report_to] if isinstance(args.report_to, str) else args.report_to or []
    reporters = [r for r in report_to if r != "none"]
    # transformers 5 dropped `logging_dir`: its loggers write under output_dir
    log_dir = getattr(args, "logging_dir", None) or out
    where = f"; {', '.join(reporters)} logs under {log_dir}" if reporters else ""
    lines.append(f"  logs: every logging step in trainer.state.log_history{where}")
    return "\n".join(lines)


# at import too: some of these warnings fire inside `Trainer.__init__` (and peft's
# wrapping before it), before a trainer can call `use_console`
silence_known_warnings()
