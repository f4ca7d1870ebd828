"""Console output of the trainers: a compact line per logging step (full metrics still in
`log_history`), the end-of-run outputs message, known-harmless warnings hidden."""

import warnings

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from transformers import PrinterCallback, ProgressCallback  # noqa: E402

from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import GRPOConfig, GRPOTrainer  # noqa: E402
from fastrl.trainers.console import (  # noqa: E402
    ConsoleCallback,
    format_log_line,
    silence_known_warnings,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def test_format_log_line_keeps_key_metrics_rounded():
    logs = {
        "loss": 0.0123456789, "grad_norm": 1.23456, "learning_rate": 0.000987654,
        "reward": 0.41234, "reward_std": 0.2, "rewards/exact_match/mean": 0.1234567,
        "rewards/exact_match/std": 0.3, "clip_ratio/low_mean": 0.0, "num_tokens": 1234.0,
        "completions/mean_length": 11.25, "tokens_per_second": 5321.77, "epoch": 0.5,
    }  # fmt: skip
    line = format_log_line(logs, 10, 200)
    assert line == (
        "step 10/200 | loss 0.01235 | reward 0.4123 | exact_match 0.1235 | reward_std 0.2 "
        "| len 11.25 | grad_norm 1.235 | lr 9.88e-04 | tok/s 5322"
    )
    assert "\n" not in line and len(line) < 160


def test_format_log_line_eval_and_final_summary():
    assert format_log_line({"eval_loss": 0.5, "eval_runtime": 1.0}, 3, 0) == (
        "step 3 | eval | loss 0.5"
    )
    final = {"train_runtime": 12.345, "train_loss": 0.25, "total_flos": 1.0}
    assert format_log_line(final, 5, 5) == "step 5/5 | done in 12.3 s | mean loss 0.25"


def test_known_harmless_warnings_are_silenced_and_others_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
            FutureWarning,
            stacklevel=2,
        )
        warnings.warn(
            "'pin_memory' argument is set as true but no accelerator is found, then device "
            "pinned memory won't be used.",
            UserWarning,
            stacklevel=2,
        )
        warnings.warn("something else", UserWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["something else"]


def _reward(prompts, completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


@pytest.mark.parametrize("disable_tqdm", [True, False])
def test_trainer_console_lines(tmp_path, capsys, disable_tqdm):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, "test", seed=0)
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
        max_steps=2, max_completion_length=4, logging_steps=1, report_to="none",
        use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=disable_tqdm,
        activation_checkpointing=False, seed=0,
    )  # fmt: skip
    data = [{"prompt": p} for p in ["1+1=", "2+3=", "4-1=", "9-9="]]
    trainer = GRPOTrainer(model, _reward, args=args, train_dataset=data, processing_class=tok)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert ConsoleCallback in kinds
    assert ProgressCallback not in kinds and PrinterCallback not in kinds
    trainer.train()
    out = capsys.readouterr().out
    assert "{" not in out  # no printed dicts
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 1/2 | loss ") and "reward " in lines[0]
    assert lines[-1].startswith("step 2/2 | done in ")
    assert "Finished 2 steps. Outputs in" in out and "checkpoint-2" in out
    # the full metrics are still logged
    first = trainer.state.log_history[0]
    assert "clip_ratio/low_mean" in first and "rewards/_reward/std" in first
