"""Adapters load afterwards (absolute base path, peft's AutoPeftModel), `fastrl sample`
prints completions and names its mistakes in one line, the resume hint, the demo's end
message. Tiny config-built models on a CPU, no training step (seconds)."""

import json
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastrl import sample  # noqa: E402
from fastrl.demo.run import _save_base, outputs_message  # noqa: E402
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import GRPOConfig, GRPOTrainer  # noqa: E402
from fastrl.trainers.interrupt import resume_command  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")


def _reward(prompts, completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture
def adapter(tmp_path, monkeypatch, capsys):
    """An adapter saved by GRPOTrainer from a base model given by a relative path."""
    monkeypatch.chdir(tmp_path)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, "test", seed=0)
    model.save_pretrained("base")
    tok.save_pretrained("base")
    args = GRPOConfig(
        output_dir="run", per_device_train_batch_size=4, num_generations=4, max_steps=1,
        max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, activation_checkpointing=False,
    )  # fmt: skip
    trainer = GRPOTrainer("./base", _reward, args=args, train_dataset=[{"prompt": "1+1="}] * 4)
    trainer.save_model("run/adapter")
    assert "Saved the adapter to run/adapter" in capsys.readouterr().out
    return tmp_path / "run" / "adapter"


def test_adapter_records_an_absolute_base_path_and_loads_elsewhere(adapter, tmp_path):
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base) and os.path.samefile(base, tmp_path / "base")
    from peft import AutoPeftModelForCausalLM

    os.chdir(adapter)  # another directory: a relative base path would not resolve
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_sample_prints_completions(adapter, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("3+4=\n\n5-2=\n")
    argv = ["--adapter", str(adapter), "--prompt", "12+7=", "--prompts", str(prompts)]
    assert sample.main([*argv, "--max_new_tokens", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[: line.index("=") + 1] for line in lines] == ["12+7=", "3+4=", "5-2="]
    # sampling is seeded: the same command prints the same thing
    assert sample.main([*argv, "--max_new_tokens", "3", "--temperature", "1"]) == 0
    first = capsys.readouterr().out
    assert sample.main([*argv, "--max_new_tokens", "3", "--temperature", "1"]) == 0
    assert capsys.readouterr().out == first


def test_sample_with_a_plain_model(tmp_path, capsys):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, "test", seed=0)
    path = _save_base(model, tok, tmp_path / "m")
    assert model.name_or_path == path and os.path.isabs(path)
    assert sample.main(["--model", path, "--prompt", "1+1=", "--max_new_tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("1+1=")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--prompt", "x"], "--adapter DIR"),
        (["--adapter", "nope", "--prompt", "x"], "--adapter nope: no such directory"),
        (["--adapter", ".", "--prompt", "x"], "no adapter_config.json"),
        (["--model", "./nope", "--prompt", "x"], "--model ./nope: no such directory"),
        (["--model", "m"], "no prompts"),
        (["--model", "m", "--prompts", "missing.txt"], "--prompts missing.txt: no such file"),
    ],
)
def test_sample_mistakes_are_one_line(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_sample_rejects_abbreviated_and_bad_values(capsys):
    with pytest.raises(SystemExit) as exc:
        sample.main(["--adapt", "x", "--prompt", "y"])  # no prefix matching
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        sample.main(["--model", "m", "--prompt", "y", "--temperature", "-1"])
    assert "--temperature" in capsys.readouterr().err


def test_resume_command_in_the_form_the_run_started():
    ckpt = "out/checkpoint-3"
    assert resume_command(ckpt, ["/usr/bin/fastrl", "grpo", "--model", "m b"]) == (
        "fastrl grpo --model 'm b' --resume_from_checkpoint out/checkpoint-3"
    )
    # a resume flag given already is replaced, in either spelling
    argv = ["fastrl", "dpo", "--resume_from_checkpoint", "old", "--resume-from-checkpoint=x"]
    assert resume_command(ckpt, argv) == "fastrl dpo --resume_from_checkpoint out/checkpoint-3"
    assert resume_command(ckpt, ["fastrl", "demo"]).endswith("(`fastrl demo` restarts)")
    assert resume_command(ckpt, ["python", "train.py"]) == (
        "trainer.train(resume_from_checkpoint='out/checkpoint-3')"
    )


def test_demo_end_message_says_how_to_sample(tmp_path):
    msg = outputs_message(tmp_path / "demo")
    assert f"fastrl sample --adapter {tmp_path / 'demo' / 'grpo_adapter'} --prompt '12+7='" in msg
    assert "AutoPeftModelForCausalLM.from_pretrained" in msg


def test_generate_leaves_padding_side(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, "test", seed=0)
    out = sample.generate(model, tok, ["1+1=", "12+34="], 3, 0.0, 0)
    assert len(out) == 2 and tok.padding_side == "right"
    assert torch.is_grad_enabled()
