"""GRPOConfig / DPOConfig refuse every bad option at construction (no model, no data),
naming the option as it is typed on the command line, the value and what is allowed."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser

import fastrl.ops.advantages.group
import fastrl.ops.policy.loss
import fastrl.ops.preference.loss
import fastrl.options.policy as policy_options
from fastrl.options import preference as opts
from fastrl.trainers import dpo_config as dpo
from fastrl.trainers import grpo_config as grpo
from fastrl.trainers.dpo_config import DPOConfig
from fastrl.trainers.grpo_config import GRPOConfig

# batch sizes that make whole groups, so only the option under test is wrong
GRPO_OK = dict(per_device_train_batch_size=4, num_generations=4, use_cpu=True)

GRPO_BAD = [
    (dict(loss_type="ppo"), r"--loss_type must be one of 'grpo', .*'luspo', 'vespo'; got 'ppo'"),
    (dict(scale_rewards="scal"), r"--scale_rewards must be one of 'group', 'batch', 'none'; got 'scal'"),  # noqa: E501
    (dict(scale_rewards="True"), r"--scale_rewards .*got 'True' \(True means 'group'"),
    (dict(importance_sampling_level="seq"), r"--importance_sampling_level .*'token', 'sequence'; got 'seq'"),  # noqa: E501
    (dict(kl_estimator="k4"), r"--kl_estimator must be one of 'k1', 'k2', 'k3'; got 'k4'"),
    (dict(multi_objective_aggregation="mean"), r"--multi_objective_aggregation .*got 'mean'"),
    (dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="batch"), r"'normalize_then_sum' .* needs --scale_rewards group, got 'batch'"),  # noqa: E501
    (dict(kernel_impl="cuda"), r"--kernel_impl must be one of 'auto', 'triton', 'torch'; got 'cuda'"),  # noqa: E501
    (dict(model_dtype="fp8"), r"--model_dtype must be one of .*'float32'; got 'fp8'"),
    (dict(beta=-0.1), r"--beta must be >= 0, got -0.1"),
    (dict(beta=float("nan")), r"--beta must be >= 0, got nan"),
    (dict(epsilon=-0.2), r"--epsilon must be >= 0, got -0.2"),
    (dict(epsilon_high=-1.0), r"--epsilon_high must be >= 0 or None, got -1.0"),
    (dict(delta=0.0), r"--delta must be > 0 or None, got 0.0"),
    (dict(delta=2.0, loss_type="cispo"), r"--delta 2.0 .*--loss_type 'cispo' does not have"),
    (dict(num_generations=1, per_device_train_batch_size=1), r"--num_generations must be >= 2 \(an integer\), got 1"),  # noqa: E501
    (dict(num_iterations=0), r"--num_iterations must be >= 1 \(an integer\), got 0"),
    (dict(max_completion_length=0), r"--max_completion_length must be >= 1 \(an integer\), got 0"),
    (dict(max_prompt_length=0), r"--max_prompt_length must be >= 1 \(an integer\) or None, got 0"),
    (dict(temperature=0.0), r"--temperature must be > 0, got 0.0"),
    (dict(top_p=1.5), r"--top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=0.0), r"--top_p must be in \(0, 1\], got 0.0"),
    (dict(top_k=-1), r"--top_k must be >= 0 \(an integer\), got -1"),
    (dict(min_p=2.0), r"--min_p must be in \[0, 1\] or None, got 2.0"),
    (dict(repetition_penalty=0.0), r"--repetition_penalty must be > 0, got 0.0"),
    (dict(sapo_temperature_pos=0.0), r"--sapo_temperature_pos must be > 0, got 0.0"),
    (dict(sapo_temperature_neg=-1.0), r"--sapo_temperature_neg must be > 0, got -1.0"),
    (dict(vespo_k_pos=-1.0, loss_type="vespo"), r"--vespo_k_pos must be >= 0, got -1.0"),
    (dict(vespo_lambda_neg=float("inf")), r"--vespo_lambda_neg must be >= 0, got inf"),
    (dict(top_entropy_quantile=1.5), r"--top_entropy_quantile must be in \[0, 1\], got 1.5"),
    (dict(entropy_coef=float("inf")), r"--entropy_coef must be a finite number, got inf"),
    (dict(reward_weights=[1.0, float("nan")]), r"--reward_weights must be a finite number, got nan"),  # noqa: E501
    (dict(lora_r=0), r"--lora_r must be >= 1 \(an integer\), got 0"),
    (dict(lora_alpha=0), r"--lora_alpha must be > 0, got 0"),
    (dict(lora_dropout=1.0), r"--lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(max_memory_gb=0.0), r"--max_memory_gb must be > 0 or None, got 0.0"),
    (dict(load_in_4bit=True), r"--load_in_4bit needs a CUDA device \(--use_cpu is set\)"),
    (dict(auto_find_batch_size=True), r"--auto_find_batch_size is not supported"),
    (dict(eval_strategy="steps"), r"--eval_strategy 'steps': GRPOTrainer has no evaluation loop"),
    (dict(do_eval=True), r"--do_eval: GRPOTrainer has no evaluation loop"),
    (dict(generation_kwargs={"stop_strings": ["\n"]}), r"--generation_kwargs stop_strings=.*not supported"),  # noqa: E501
    (dict(generation_batch_size=8, steps_per_generation=2), r"--generation_batch_size \(8\) or --steps_per_generation \(2\), not both"),  # noqa: E501
    (dict(generation_batch_size=6), r"--generation_batch_size 6 must be a multiple of --per_device_train_batch_size"),  # noqa: E501
    (dict(steps_per_generation=0), r"--steps_per_generation must be >= 1 \(an integer\) or None, got 0"),  # noqa: E501
    (dict(per_device_train_batch_size=3), r"--per_device_train_batch_size x --steps_per_generation = 3 x 1 = 3 .*multiple of num_generations \(--num_generations 4\)"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize("kw,match", GRPO_BAD, ids=[next(iter(k)) for k, _ in GRPO_BAD])
def test_grpo_config_refuses(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(str(tmp_path), **{**GRPO_OK, **kw})


DPO_BAD = [
    (dict(loss_type="nope"), r"--loss_type must be one of \('sigmoid', .*got 'nope'"),
    (dict(loss_type=[]), r"--loss_type needs at least one loss type"),
    (dict(loss_type=["sigmoid", "simpo"]), r"--loss_type lists .*'simpo' is a reference-free"),
    (dict(beta=-0.1), r"--beta must be > 0, got -0.1"),
    (dict(beta=0.0), r"--beta must be > 0, got 0.0"),
    (dict(loss_type="orpo", beta=-0.1), r"--beta must be >= 0, got -0.1"),
    (dict(label_smoothing=0.5), r"--label_smoothing must be in \[0, 0.5\), got 0.5"),
    (dict(loss_type="exo_pair"), r"--loss_type='exo_pair' needs --label_smoothing > 0"),
    (dict(loss_type="ipo", label_smoothing=0.1), r"--label_smoothing=0.1 has no effect on --loss_type='ipo'"),  # noqa: E501
    (dict(f_divergence_type="kl"), r"--f_divergence_type must be one of 'reverse_kl', .*; got 'kl'"),  # noqa: E501
    (dict(f_alpha_divergence_coef=float("nan")), r"--f_alpha_divergence_coef must be a finite number, got nan"),  # noqa: E501
    (dict(discopop_tau=0.0), r"--discopop_tau must be > 0, got 0.0"),
    (dict(ld_alpha=1.5), r"--ld_alpha must be in \[0, 1\] or None, got 1.5"),
    (dict(dpop_lambda=-1.0), r"--dpop_lambda must be >= 0, got -1.0"),
    (dict(loss_type="ipo", rdpo_alpha=0.1), r"--rdpo_alpha=0.1 is R-DPO's, for --loss_type='sigmoid'"),  # noqa: E501
    (dict(simpo_gamma=0.5), r"--simpo_gamma=0.5 is SimPO's"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), r"--loss_weights 1.0 must hold one weight per --loss_type \(sigmoid ipo\): 2, got 1"),  # noqa: E501
    (dict(use_weighting=True, loss_type="aot"), r"--use_weighting=True \(WPO\) cannot weight 'aot'"),  # noqa: E501
    (dict(loss_type="simpo", precompute_ref_log_probs=True), r"--precompute_ref_log_probs is set, but --loss_type simpo uses no reference"),  # noqa: E501
    (dict(max_length=0), r"--max_length must be >= 1 \(an integer\) or None, got 0"),
    (dict(max_prompt_length=-1), r"--max_prompt_length must be >= 1 \(an integer\) or None, got -1"),  # noqa: E501
    (dict(max_completion_length=0), r"--max_completion_length must be >= 1 \(an integer\) or None, got 0"),  # noqa: E501
    (dict(precompute_ref_batch_size=0), r"--precompute_ref_batch_size must be >= 1"),
    (dict(pad_to_multiple_of=0), r"--pad_to_multiple_of must be >= 1"),
    (dict(kernel_impl="gpu"), r"--kernel_impl must be one of 'auto', 'triton', 'torch'; got 'gpu'"),  # noqa: E501
    (dict(lora_r=0), r"--lora_r must be >= 1 \(an integer\), got 0"),
]  # fmt: skip


@pytest.mark.parametrize("kw,match", DPO_BAD, ids=[next(iter(k)) for k, _ in DPO_BAD])
def test_dpo_config_refuses(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        DPOConfig(str(tmp_path), use_cpu=True, **kw)


def test_dpo_config_reads_the_preference_options(tmp_path):
    # no copies: the loss options' choices and defaults are PreferenceLossOptions'
    choices = DPOConfig.__dataclass_fields__["f_divergence_type"].metadata["choices"]
    assert choices == list(opts.F_DIVERGENCES)
    assert not hasattr(dpo, "REFERENCE_FREE_LOSS_TYPES")  # the config keeps no copy
    args = DPOConfig(str(tmp_path), use_cpu=True)
    assert args.preference_loss_options() == opts.PreferenceLossOptions()
    assert args.preference_loss_kwargs() == {}
    # TRL's two options set for every loss type: passed where they apply only
    assert args.f_alpha_divergence_coef == 0.5 and args.discopop_tau == 0.05
    args = DPOConfig(str(tmp_path), f_divergence_type="alpha_divergence", use_cpu=True)
    assert args.preference_loss_options().f_alpha_divergence_coef == 0.5
    args = DPOConfig(str(tmp_path), loss_type="discopop", discopop_tau=0.2, use_cpu=True)
    assert args.preference_loss_kwargs() == dict(loss_type="discopop", discopop_tau=0.2)
    assert DPOConfig(str(tmp_path), discopop_tau=0.2, use_cpu=True).preference_loss_kwargs() == {}


@pytest.mark.parametrize("config", [GRPOConfig, DPOConfig])
def test_triton_needs_cuda_or_the_interpreter(tmp_path, monkeypatch, config):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"--kernel_impl 'triton' needs a CUDA device"):
        config(str(tmp_path), kernel_impl="triton", use_cpu=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs the kernels on CPU
    config(str(tmp_path), kernel_impl="triton", use_cpu=True)


def test_defaults_and_edges_pass(tmp_path):
    GRPOConfig(str(tmp_path), **GRPO_OK)
    args = GRPOConfig(str(tmp_path), scale_rewards=False, beta=0.0, top_k=0, **GRPO_OK)
    assert args.scale_rewards == "none"  # TRL's bool form
    vespo = GRPOConfig(str(tmp_path), loss_type="vespo", vespo_k_pos=0.5, **GRPO_OK)
    assert vespo.policy_loss_kwargs()["vespo_k_pos"] == 0.5  # reaches the loss
    with pytest.warns(UserWarning, match=r"vespo' computes its sequence-level weight itself"):
        GRPOConfig(
            str(tmp_path), loss_type="vespo", importance_sampling_level="sequence", **GRPO_OK
        )
    DPOConfig(str(tmp_path), use_cpu=True)
    DPOConfig(str(tmp_path), loss_type="orpo", beta=0.0, use_cpu=True)  # ORPO: NLL alone


def test_command_line_values_are_checked_as_typed(tmp_path):
    parser = HfArgumentParser(GRPOConfig)
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--num_generations", "2"]
    with pytest.raises(ValueError, match=r"--scale_rewards .*got 'Group'"):
        parser.parse_args_into_dataclasses([*argv, "--scale_rewards", "Group"])
    with pytest.raises(ValueError, match=r"--beta must be >= 0, got -0.1"):
        parser.parse_args_into_dataclasses([*argv, "--beta", "-0.1"])
    with pytest.raises(ValueError, match=r"--beta must be > 0, got -1.0"):
        HfArgumentParser(DPOConfig).parse_args_into_dataclasses([*argv[:3], "--beta", "-1"])


def test_grpo_loss_options_have_one_home(tmp_path):
    # the policy loss's choices and defaults live in fastrl.options.policy, which the loss
    # and GRPOConfig both read (no copies): the config's loss settings are its fields
    # but the per-step ones (the trainer passes those), with the options' defaults but TRL's
    # max_completion_length (a generation option too) and the sampler correction (TRL's
    # vllm_importance_sampling_*: off without use_vllm, the sampler being the policy)
    assert not hasattr(grpo, "POLICY_LOSS_TYPES") and not hasattr(grpo, "_CLIPPED")
    kwargs = GRPOConfig(str(tmp_path), **GRPO_OK).policy_loss_kwargs()
    names = policy_options.PolicyLossOptions.names()
    assert set(kwargs) == set(names) - set(policy_options.PER_STEP)
    defaults = policy_options.PolicyLossOptions()
    for name, value in kwargs.items():
        if name not in ("max_completion_length", "sampling_correction"):
            assert value == getattr(defaults, name), name
    assert kwargs["sampling_correction"] is None
    assert kwargs["max_completion_length"] == 512
    # the config checks its options again when the trainer asks for them
    args = GRPOConfig(str(tmp_path), **GRPO_OK)
    args.loss_type = "cispo"
    args.delta = 2.0
    with pytest.raises(ValueError, match=r"--delta 2.0 .*--loss_type 'cispo' does not have"):
        args.policy_loss_kwargs()


def test_advantage_choices_are_the_ops():
    # one declaration (fastrl.options.advantages) for the op, the config and the CLI
    from fastrl.options import advantages

    assert grpo.SCALES is advantages.SCALES is fastrl.ops.advantages.group.SCALES
    assert grpo.AGGREGATIONS is advantages.AGGREGATIONS


# ------------------------------------------- what every config checks alike (and PPO's)


def _config(name: str, tmp_path, **kw):
    from fastrl.trainers import KTOConfig, PPOConfig, RewardConfig

    classes = {"grpo": GRPOConfig, "dpo": DPOConfig, "kto": KTOConfig, "rm": RewardConfig,
               "ppo": PPOConfig}  # fmt: skip
    extra = GRPO_OK if name == "grpo" else {"use_cpu": True}
    return classes[name](str(tmp_path), **{**extra, **kw})


COMMANDS = ["grpo", "dpo", "kto", "rm", "ppo"]
TRAINING_BAD = [
    (dict(learning_rate=-1e-5), r"--learning_rate must be >= 0, got -1e-05"),
    # Trainer's own label smoothing: no fastrl loss reads it (DPO's is --label_smoothing)
    (dict(label_smoothing_factor=0.1), r"--label_smoothing_factor 0.1 is not supported.*--label_smoothing"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kw,match", TRAINING_BAD, ids=["lr<0", "label_smoothing"])
def test_every_config_refuses_what_its_trainer_would_ignore_or_fail_on(
    tmp_path, command, kw, match
):
    with pytest.raises(ValueError, match=match):
        _config(command, tmp_path, **kw)


def test_ppo_missing_eos_penalty_is_subtracted_so_it_is_not_negative(tmp_path):
    with pytest.raises(ValueError, match=r"--missing_eos_penalty must be >= 0 or None, got -1"):
        _config("ppo", tmp_path, missing_eos_penalty=-1.0)
    assert _config("ppo", tmp_path, missing_eos_penalty=0.0).missing_eos_penalty == 0.0


# ------------------------------------------------ datasets, checked when a trainer builds one


def test_text_columns_must_hold_text():
    from fastrl.trainers.data import load_data, require_columns

    pairs = ("prompt", "chosen", "rejected")
    with pytest.raises(ValueError, match=r"DPO: column 'chosen' .* row 0 holds 7 \(int\)"):
        require_columns(load_data({"prompt": ["a"], "chosen": [7], "rejected": ["c"]}), pairs,
                        "DPO")  # fmt: skip
    with pytest.raises(ValueError, match=r"column 'prompt' .* row 1 holds None"):
        require_columns(load_data({"prompt": ["a", None]}), ("prompt",), "PPOTrainer")
    # an optional prompt (reward pairs) may be None; a present one must still be text
    require_columns(load_data({"prompt": [None, "a"], "chosen": ["b", "b"],
                               "rejected": ["c", "c"]}), ("chosen", "rejected"), "rm")  # fmt: skip
    with pytest.raises(ValueError, match=r"column 'prompt' .* row 0 holds 5 \(int\)"):
        require_columns(load_data({"prompt": [5], "chosen": ["b"], "rejected": ["c"]}),
                        ("chosen", "rejected"), "rm")  # fmt: skip
    # chat messages and the non-text columns (an int answer, a bool label) pass
    chat = [{"role": "user", "content": "1+1="}]
    require_columns(load_data([{"prompt": chat, "answer": 2}]), ("prompt",), "GRPOTrainer")


def test_csv_text_columns_are_read_as_strings(tmp_path):
    from fastrl.trainers.data import check_data_file, load_data, require_columns

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\n12,007,3,0.5\n")
    data = load_data(path)
    assert data[0] == {"prompt": "12", "chosen": "007", "rejected": "3", "margin": 0.5}
    require_columns(data, ("chosen", "rejected"), "rm")
    # Excel's "CSV UTF-8" starts with a byte-order mark: the first column is still 'prompt'
    bom = tmp_path / "bom.csv"
    bom.write_bytes("prompt,completion,label\n12,3,true\n".encode("utf-8-sig"))
    assert check_data_file(bom) == ["prompt", "completion", "label"]
    assert load_data(bom)[0] == {"prompt": "12", "completion": "3", "label": True}
    # a reward function's answer column reaches it as the file holds it
    grpo = tmp_path / "grpo.csv"
    grpo.write_text("prompt,answer\n1+1=,2\n")
    assert load_data(grpo)[0] == {"prompt": "1+1=", "answer": 2}


def test_text_columns_read_from_their_type_include_large_lists():
    import datasets

    from fastrl.trainers.data import _is_text_feature

    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    assert _is_text_feature(datasets.LargeList(message))
    assert _is_text_feature(datasets.List(message))
    assert not _is_text_feature(datasets.LargeList(datasets.Value("string")))


def _tiny_ppo(tmp_path, data, tok=None, **kw):
    from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer
    from fastrl.trainers import PPOConfig, PPOTrainer

    tok = tok or build_tiny_tokenizer()
    args = PPOConfig(str(tmp_path), use_cpu=True, report_to="none", **kw)
    return PPOTrainer(build_tiny_model(tok, "test"), lambda prompts, completions, **c: [0.0],
                      args=args, train_dataset=data, processing_class=tok)  # fmt: skip


def test_ppo_refuses_at_init_what_would_fail_at_the_first_rollout(tmp_path):
    with pytest.raises(ValueError, match=r"has 3 prompts, fewer than one PPO rollout takes: "
                       r"--per_device_train_batch_size 2 x --gradient_accumulation_steps 1 x "
                       r"--num_mini_batches 2 = 4"):  # fmt: skip
        _tiny_ppo(tmp_path, [{"prompt": "a"}] * 3, per_device_train_batch_size=2,
                  num_mini_batches=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"PPOTrainer: column 'prompt' .* row 0 holds 5"):
        _tiny_ppo(tmp_path, [{"prompt": 5}] * 8, per_device_train_batch_size=2)
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"chat messages \(row 0 .*no chat_template"):
        _tiny_ppo(tmp_path, [{"prompt": chat}] * 8, per_device_train_batch_size=2)
