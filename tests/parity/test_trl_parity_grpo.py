"""Parity with TRL 1.16: `policy_loss` and `group_advantages` against TRL's own trainers.

Nothing here re-implements TRL. A real `trl.GRPOTrainer` (and `trl.RLOOTrainer`) is built
once per module around a tiny random Llama; each case sets the attributes the trainer
reads at call time (`loss_type`, `beta`, `args.delta`, ...; see `_configure`) and runs
its `_compute_loss` / `_generate_and_score_completions` on hand-made inputs:

- loss parity 1: TRL's loss on its own per-token log-probs vs `policy_loss` on the very
  same log-prob tensors (captured from TRL's forward), gradients w.r.t. those log-probs,
  the entropies and every model parameter;
- loss parity 2: `policy_loss` on log-probs computed independently in the test (full
  logits, `log_softmax`), gradients w.r.t. every model parameter;
- metrics: every metric TRL logged for the step;
- advantages and the vLLM importance-sampling correction: TRL's
  `_generate_and_score_completions` with its generation step replaced by fixed token ids
  and sampler log-probs, and rewards read from dataset columns.
"""

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastrl import group_advantages, policy_loss  # noqa: E402
from tests.support.compare import TOL_OWN_LOGPS, TOL_SAME_LOGPS, _assert_grads_close, _grads  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402
from tests.support.trl_grpo import (  # noqa: E402
    GA,
    GRID,
    LOSS_TYPES,
    B,
    G,
    T,
    _batch,
    _common_args,
    _configure,
    _fastrl_kwargs,
    _grpo_trainer,
    _inputs,
    _own_logps,
    _reward_funcs,
    _trl_step,
)

# transformers 5 renamed gradient_checkpointing (which GRPOConfig sets) and warns on each use
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

assert trl.__version__ == "1.16.0", f"parity is pinned to TRL 1.16.0, found {trl.__version__}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def grpo(tmp_path_factory):
    return _grpo_trainer(tmp_path_factory.mktemp("grpo"))


@pytest.fixture(scope="module")
def rloo(tmp_path_factory):
    args = trl.RLOOConfig(**_common_args(tmp_path_factory.mktemp("rloo")), beta=0.0)
    ds = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 2})
    trainer = trl.RLOOTrainer(
        model=tiny_model(),
        reward_funcs=_reward_funcs(3),
        args=args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


# --------------------------------------------------------------------------- the check


def _check(trainer, inputs, monkeypatch, *, own_path=True):
    """Run TRL and fastrl on the same inputs and compare loss, gradients and metrics."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    trl_loss, lp, ent, trl_metrics = _trl_step(trainer, inputs, monkeypatch)
    trl_param_grads = _grads(trl_loss, params)
    trl_lp_grads = _grads(trl_loss, [lp, ent])

    kw = _fastrl_kwargs(trainer, inputs)
    mask = inputs["completion_mask"]
    old = inputs.get("old_per_token_logps")
    adv = inputs["advantages"]

    # 1. the same log-prob tensors TRL computed
    loss, metrics = policy_loss(lp, old, adv, mask, entropy=ent, **kw)
    torch.testing.assert_close(loss, trl_loss, **TOL_SAME_LOGPS)
    _assert_grads_close(_grads(loss, [lp, ent]), trl_lp_grads, TOL_SAME_LOGPS)
    _assert_grads_close(_grads(loss, params), trl_param_grads, TOL_SAME_LOGPS)

    # metrics: everything TRL logged for this step, under the same name (but the entropy
    # coefficient, which TRL logs as a setting and fastrl takes as an argument)
    trl_metrics.pop("entropy_coef", None)
    assert set(trl_metrics) <= set(metrics), set(trl_metrics) - set(metrics)
    for name, value in trl_metrics.items():
        torch.testing.assert_close(
            metrics[name], torch.tensor(value), equal_nan=True, **TOL_SAME_LOGPS, msg=name
        )

    # 2. log-probs computed independently from the same model
    if own_path:
        own_lp, own_ent = _own_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            inputs["completion_ids"],
            mask,
            temperature=trainer.temperature,
        )
        torch.testing.assert_close(own_lp * mask, lp, **TOL_OWN_LOGPS)
        loss2, _ = policy_loss(own_lp, old, adv, mask, entropy=own_ent, **kw)
        torch.testing.assert_close(loss2, trl_loss, **TOL_OWN_LOGPS)
        _assert_grads_close(_grads(loss2, params), trl_param_grads, TOL_OWN_LOGPS)
    return trl_loss, loss, metrics


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize(
    "loss_type,level,beta,delta", GRID, ids=["-".join(map(str, c)) for c in GRID]
)
def test_loss_matches_trl(grpo, monkeypatch, loss_type, level, beta, delta):
    _configure(grpo, loss_type=loss_type, level=level, beta=beta, delta=delta)
    seed = GRID.index((loss_type, level, beta, delta))
    inputs = _inputs(grpo, seed)
    if delta is not None and loss_type in ("cispo", "sapo", "vespo"):
        # TRL accepts delta here and ignores it (it only caps the clipped surrogate's ratio);
        # fastrl refuses an option that would have no effect.
        with_delta = grpo._compute_loss(grpo.model, inputs)
        _configure(grpo, loss_type=loss_type, level=level, beta=beta, delta=None)
        without = grpo._compute_loss(grpo.model, inputs)
        assert torch.equal(with_delta, without)
        kw = _fastrl_kwargs(grpo, inputs)
        kw["delta"] = delta
        with pytest.raises(ValueError, match="delta"):
            policy_loss(
                torch.zeros(B, T), None, inputs["advantages"], inputs["completion_mask"], **kw
            )
        return
    trl_loss, _, metrics = _check(grpo, inputs, monkeypatch)
    assert torch.isfinite(trl_loss)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        # the inputs are off-policy enough for the clip to be active somewhere
        assert metrics["clip_ratio/region_mean"] > 0


def test_trl_accepts_the_whole_grid(tmp_path):
    # GRPOConfig rejects none of the grid's combinations (GRPOTrainer.__init__ only logs a
    # warning for sequence-level bnpo/dr_grpo/dapo/cispo), so none is skipped above.
    from accelerate.state import AcceleratorState, PartialState

    # Every TrainingArguments resets accelerate's process-wide state in place, which the
    # module's trainers share: put it back afterwards.
    saved = [
        (cls._shared_state, dict(cls._shared_state)) for cls in (AcceleratorState, PartialState)
    ]
    try:
        for loss_type, level, beta, delta in GRID:
            args = trl.GRPOConfig(
                **_common_args(tmp_path),
                loss_type=loss_type,
                importance_sampling_level=level,
                beta=beta,
                delta=delta,
            )
            assert (args.loss_type, args.importance_sampling_level) == (loss_type, level)
    finally:
        for shared, copy in saved:
            shared.clear()
            shared.update(copy)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_entropy_mask_and_bonus_match_trl(grpo, monkeypatch, loss_type):
    # 33 tokens: the 0.5-quantile is exactly the 17th smallest entropy, so the ">=" of the
    # high-entropy mask matters
    _configure(grpo, loss_type=loss_type, top_entropy_quantile=0.5, entropy_coef=0.03, beta=0.02)
    _check(grpo, _inputs(grpo, 100 + LOSS_TYPES.index(loss_type)), monkeypatch)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_off_policy_mask_and_options_match_trl(grpo, monkeypatch, loss_type, level):
    _configure(
        grpo,
        loss_type=loss_type,
        level=level,
        beta=0.05,
        off_policy_mask_threshold=0.02,
        use_bias_correction_kl=False,
        sapo=(0.7, 1.3),
        epsilon=0.15,
        epsilon_high=3.0 if loss_type == "cispo" else 0.25,
    )
    _check(grpo, _inputs(grpo, 200), monkeypatch)


@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("vespo", [(0.5, 0.8, 1.5, 0.3), (0.0, 0.0, 4.0, 1.0)])
def test_vespo_options_match_trl(grpo, monkeypatch, vespo, adv_shape):
    # the four Gamma-weight options away from their defaults (lambda 0: TRL's 1e-4 clamp),
    # per-sequence and per-token advantages (a per-token sign picks k and lambda), the KL
    _configure(grpo, loss_type="vespo", beta=0.04, vespo=vespo)
    _, _, metrics = _check(grpo, _inputs(grpo, 260, adv_shape=adv_shape), monkeypatch)
    # the weights are neither all 0 nor all 1 on these off-policy inputs
    assert 0.05 < metrics["vespo/phi_seq_mean"] < 0.95 or metrics["vespo/phi_seq_mean"] > 1.05


def test_vespo_refuses_a_sequence_sampling_correction():
    # TRL refuses it at GRPOTrainer.__init__ (vespo folds token ratios into its weight)
    x = torch.zeros(B, T)
    mask = torch.ones(B, T)
    kw = dict(loss_type="vespo", num_items_in_batch=3, sampling_logps=x, sampling_clip_max=2.0)
    for mode in ("sequence_mask", "sequence_truncate"):
        match = rf"loss_type='vespo'.*got sampling_correction='{mode}'"
        with pytest.raises(ValueError, match=match):
            policy_loss(x, x, torch.ones(B), mask, sampling_correction=mode, **kw)
    # no sampler log-probs: nothing to correct, the default mode is not in the way
    policy_loss(x, x, torch.ones(B), mask, loss_type="vespo", num_items_in_batch=3)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_delta_below_the_upper_clip_matches_trl(grpo, monkeypatch, loss_type, level):
    # delta < 1 + epsilon_high: the capped ratio never counts as high-clipped in TRL's metric
    _configure(grpo, loss_type=loss_type, level=level, delta=1.1, epsilon_high=0.28)
    _, _, metrics = _check(grpo, _inputs(grpo, 250), monkeypatch)
    assert metrics["clip_ratio/high_mean"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo"])
def test_per_token_advantages_match_trl(grpo, monkeypatch, loss_type):
    _configure(grpo, loss_type=loss_type, beta=0.04)
    _check(grpo, _inputs(grpo, 300, adv_shape="BT"), monkeypatch)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_on_policy_and_eval_mode_match_trl(grpo, monkeypatch, loss_type):
    _configure(grpo, loss_type=loss_type, beta=0.04)
    inputs = _inputs(grpo, 400)
    del inputs["old_per_token_logps"]  # TRL uses logps.detach(), as old_logps=None does
    _check(grpo, inputs, monkeypatch)
    grpo.model.eval()  # TRL's eval loss: no gradient-accumulation scaling
    try:
        _check(grpo, inputs, monkeypatch, own_path=False)
    finally:
        grpo.model.train()


# --------------------------------------------------------------------------- generation batch


def _generation_batch(trainer, seed, rewards, sampling_noise):
    """Replace TRL's generation with fixed ids and sampler log-probs; rewards as columns."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, g = _batch(seed)
    with torch.no_grad():
        lp, _ = _own_logps(trainer.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    sampling = lp + sampling_noise * torch.randn(B, T, generator=g)
    sampling[1, 2] = float("nan")  # a token the sampler could not score
    prompts_list = [prompt_ids[b][prompt_mask[b].bool()].tolist() for b in range(B)]
    lens = completion_mask.sum(1).tolist()
    completions_list = [completion_ids[b, : lens[b]].tolist() for b in range(B)]
    sampling_list = [
        [None if math.isnan(x) else x for x in sampling[b, : lens[b]].tolist()] for b in range(B)
    ]
    texts = [" ".join(f"w{i - 3}" for i in ids) for ids in completions_list]

    def fake_generate(prompts):
        assert len(prompts) == B
        return prompts_list, completions_list, None, texts, sampling_list, {}, None, []

    K = rewards.shape[1]
    examples = [
        {"prompt": "w1 w2 w3", **{f"r{k}": _none(rewards[b, k]) for k in range(K)}}
        for b in range(B)
    ]
    return examples, fake_generate


def _none(x):
    x = float(x)
    return None if math.isnan(x) else x


def _set_rewards(trainer, K, weights):
    trainer.reward_funcs = _reward_funcs(K)
    trainer.reward_func_names = [f.__name__ for f in trainer.reward_funcs]
    trainer.reward_processing_classes = [None] * K
    trainer.reward_weights = torch.tensor(weights, dtype=torch.float32)


NAN = float("nan")
# Two prompts x four completions. Values are exact in binary so that TRL's float32 mean of a
# constant group is exact too (TRL gives ~1e-4 * |r| instead of 0 when it is not).
REWARDS_1 = torch.tensor([[1.0], [0.0], [0.5], [1.0], [0.25], [0.25], [0.25], [0.25]])
REWARDS_3 = torch.tensor(
    [
        [1.0, 0.0, 2.0],
        [0.0, NAN, 1.0],
        [0.5, 1.0, NAN],
        [NAN, NAN, NAN],  # unscorable: every reward function returned None
        [0.75, 0.0, 1.0],
        [0.75, 0.5, 1.0],
        [0.75, 0.0, 3.0],
        [0.75, 1.0, 1.0],
    ]
)
ADV_CASES = [
    ("group", "sum_then_normalize", REWARDS_1, [1.0]),
    ("batch", "sum_then_normalize", REWARDS_1, [1.0]),
    ("none", "sum_then_normalize", REWARDS_1, [1.0]),
    ("group", "sum_then_normalize", REWARDS_3, [1.0, 0.5, -0.25]),
    ("batch", "sum_then_normalize", REWARDS_3, [1.0, 0.5, -0.25]),
    ("none", "sum_then_normalize", REWARDS_3, [1.0, 0.5, -0.25]),
    ("group", "normalize_then_sum", REWARDS_3, [1.0, 0.5, -0.25]),
    ("group", "normalize_then_sum", REWARDS_1, [1.0]),
]


@pytest.mark.parametrize("scale,aggregation,rewards,weights", ADV_CASES)
def test_grpo_advantages_match_trl(grpo, monkeypatch, scale, aggregation, rewards, weights):
    _configure(grpo)
    grpo.args.steps_per_generation = GA  # aligned: TRL skips old log-probs
    _set_rewards(grpo, rewards.shape[1], weights)
    grpo.scale_rewards = scale
    grpo.multi_objective_aggregation = aggregation
    examples, fake_generate = _generation_batch(grpo, 500, rewards, 0.0)
    monkeypatch.setattr(grpo, "_generate", fake_generate)
    out = grpo._generate_and_score_completions(examples)
    ours = group_advantages(
        rewards, G, baseline="mean", scale=scale, weights=weights, normalize=aggregation
    )
    torch.testing.assert_close(ours, out["advantages"], rtol=1e-5, atol=1e-6)
    assert not torch.isnan(ours).any()


@pytest.mark.parametrize("normalize_advantages", [False, True])
@pytest.mark.parametrize("rewards,weights", [(REWARDS_1, [1.0]), (REWARDS_3, [1.0, 0.5, -0.25])])
def test_rloo_advantages_match_trl(rloo, monkeypatch, normalize_advantages, rewards, weights):
    _set_rewards(rloo, rewards.shape[1], weights)
    rloo.normalize_advantages = normalize_advantages
    rloo.beta = 0.0
    examples, fake_generate = _generation_batch(rloo, 600, rewards, 0.0)

    def fake_rloo_generate(prompts):  # RLOOTrainer._generate returns ids and texts only
        prompt_ids, completion_ids, _, texts, *_ = fake_generate(prompts)
        return prompt_ids, completion_ids, texts

    monkeypatch.setattr(rloo, "_generate", fake_rloo_generate)
    out = rloo._generate_and_score_completions(examples)
    scale = "batch" if normalize_advantages else "none"
    ours = group_advantages(rewards, G, baseline="rloo", scale=scale, weights=weights)
    torch.testing.assert_close(ours, out["advantages"], rtol=1e-5, atol=1e-6)


SAMPLING_CASES = [
    ("token_truncate", (None, 1.2), "dapo"),
    ("token_mask", (0.8, 1.25), "grpo"),
    ("sequence_truncate", (0.5, 2.0), "bnpo"),
    ("sequence_mask", (None, 3.0), "cispo"),
    ("sequence_mask", (0.9, 1.1), "sapo"),
    ("token_truncate", (None, 1.1), "vespo"),  # vespo folds the token ratios into its phi
    ("token_mask", (0.9, 1.1), "vespo"),
]


@pytest.mark.parametrize("mode,clip,loss_type", SAMPLING_CASES)
def test_sampling_correction_matches_trl(grpo, monkeypatch, mode, clip, loss_type):
    _configure(grpo, loss_type=loss_type, vllm_mode=mode, clip=clip, off_policy_mask_threshold=0.05)
    _set_rewards(grpo, 3, [1.0, 0.5, -0.25])
    grpo.scale_rewards = "group"
    grpo.multi_objective_aggregation = "sum_then_normalize"
    examples, fake_generate = _generation_batch(grpo, 700, REWARDS_3, 0.15)
    monkeypatch.setattr(grpo, "_generate", fake_generate)
    out = grpo._generate_and_score_completions(examples)
    gen_metrics = {k: v[-1] for k, v in grpo._metrics["train"].items() if k.startswith("sampling/")}
    assert len(gen_metrics) == 5
    monkeypatch.undo()

    # TRL's old log-probs come from the same model, so the step is on-policy; the
    # correction uses them against the sampler's log-probs.
    trl_loss, _, metrics = _check(grpo, out, monkeypatch)
    for name, value in gen_metrics.items():
        torch.testing.assert_close(metrics[name], torch.tensor(value), **TOL_SAME_LOGPS, msg=name)
