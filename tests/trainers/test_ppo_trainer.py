"""PPOTrainer on the tiny config-built model, CPU.

- a short run changes the LoRA weights and the value head (nothing else), the loss is
  finite and TRL's PPO metrics are logged;
- on a fixed rollout, the advantages / returns are `fastrl.gae_advantages` of the
  rollout's per-token rewards (`kl_shaped_rewards` of the scores) and old values,
  whitened by `masked_whiten`; the old values are the value head on the policy's hidden
  states; the reference log-probs are the adapter-free model's;
- one training micro-step runs the backbone once, and the lm_head never;
- the loss equals `policy_loss(loss_type="bnpo") + vf_coef * value_loss` computed
  independently;
- save_model writes the value head next to the adapter, and it loads back;
- bad options fail with the flag named;
- DDP on two CPU processes (gloo), each with its own prompts: both ranks end with the
  same LoRA and value-head weights, and with the weights (and logged metrics) one
  process ends with on the same global batch (the advantages are whitened over both
  ranks' rollouts; SGD; completions fixed per prompt and all of full length, so each
  rank's token mean weighs as many tokens); FSDP1 is refused by name (FSDP2 and ZeRO-3:
  tests/trainers/test_sharded_ppo.py).
"""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastrl import (  # noqa: E402
    gae_advantages,
    kl_shaped_rewards,
    linear_logprobs,
    masked_whiten,
    policy_loss,
    value_loss,
)
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import PPOConfig, PPOTrainer  # noqa: E402
from fastrl.trainers.model import completion_positions, last_hidden_states  # noqa: E402
from fastrl.trainers.ppo_trainer import VALUE_HEAD_NAME, load_value_head  # noqa: E402
from tests.support.args import cpu_args  # noqa: E402
from tests.support.ranks import assert_ranks_end_equal  # noqa: E402
from tests.support.rollouts import PROMPTS, letter_share  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def _args(tmp_path, **overrides):
    kw = dict(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_mini_batches=2,
        num_ppo_epochs=1,
        max_completion_length=5,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        disable_tqdm=True,
        temperature=1.0,
        activation_checkpointing=False,
    )
    return PPOConfig(**cpu_args(tmp_path, **{**kw, **overrides}))


def _trainer(tmp_path, reward_funcs=letter_share, **overrides):
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, "test", seed=0)
    data = [{"prompt": p} for p in PROMPTS]
    return PPOTrainer(
        model, reward_funcs, args=_args(tmp_path, **overrides), train_dataset=data,
        processing_class=tok,
    )  # fmt: skip


def _perturb_lora(model, scale=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def test_run_trains_lora_and_value_head_and_logs(tmp_path):
    trainer = _trainer(tmp_path, max_steps=3, num_ppo_epochs=2)  # 2 rollouts' worth of steps
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {"lora": False, "value_head": False}
    for n, p in trainer.model.named_parameters():
        kind = "lora" if "lora_" in n else "value_head" if "value_head" in n else None
        if kind is None:
            assert torch.equal(p, before[n]), f"{n} changed"
        else:
            changed[kind] |= not torch.equal(p, before[n])
    assert changed == {"lora": True, "value_head": True}
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    keys = {k for e in trainer.state.log_history for k in e}
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward",
                "objective/non_score_reward", "objective/entropy", "policy/approxkl_avg",
                "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
                "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                "rewards/letter_share/mean", "tokens_per_second"):  # fmt: skip
        assert key in keys, key


def _fixed_batch(trainer):
    torch.manual_seed(3)
    tok = trainer.processing_class
    P, T = 3, 5
    prompt_ids = torch.randint(3, 64, (4, P))
    prompt_mask = torch.ones(4, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    prompt_ids[0, 0] = tok.pad_token_id
    completion_ids = torch.randint(3, 64, (4, T))
    completion_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    completion_ids = torch.where(completion_mask.bool(), completion_ids, tok.pad_token_id)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask)  # fmt: skip


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_rollout_advantages_are_gae_of_rewards_and_values(tmp_path, whiten_rewards):
    trainer = _trainer(tmp_path, kl_coef=0.3, gamma=0.9, lam=0.8, whiten_rewards=whiten_rewards)
    model = trainer.model
    _perturb_lora(model)  # the reference differs from the policy
    batch = _fixed_batch(trainer)
    scores = torch.tensor([0.5, -1.0, 2.0, 0.0])
    rewards = scores[:, None]
    truncated = torch.zeros(4, dtype=torch.bool)
    t = trainer._experience(batch, scores, rewards, truncated)["tensors"]
    mask = batch["completion_mask"]
    m = mask.float()
    # independently: the policy's hidden states -> value head and log-probs; the base's
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], mask], 1)
    targets = torch.where(mask.bool(), batch["completion_ids"], -100)
    weight = model.get_base_model().lm_head.weight
    with torch.no_grad():
        h = completion_positions(last_hidden_states(model, ids, att), 3)
        values = model.value_head(h).squeeze(-1) * m
        logps = linear_logprobs(h, weight, targets)
        with model.disable_adapter():
            ref = linear_logprobs(
                completion_positions(last_hidden_states(model, ids, att), 3), weight, targets
            )
    torch.testing.assert_close(t["old_values"], values)
    torch.testing.assert_close(t["old_logps"], logps)
    torch.testing.assert_close(t["ref_logps"], ref)
    assert (t["old_logps"] - t["ref_logps"]).abs().max() > 1e-3
    token_rewards = kl_shaped_rewards(scores, mask, kl=(logps - ref) * m, kl_coef=0.3)
    if whiten_rewards:
        mean = (token_rewards * m).sum() / m.sum()
        token_rewards = masked_whiten(token_rewards, mask) + mean * m
    torch.testing.assert_close(t["token_rewards"], token_rewards)
    adv, ret = gae_advantages(t["token_rewards"], t["old_values"], mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(t["returns"], ret)
    torch.testing.assert_close(t["raw_advantages"], adv)
    torch.testing.assert_close(t["advantages"], masked_whiten(adv, mask))


def test_one_backbone_pass_per_micro_step_and_the_loss(tmp_path):
    trainer = _trainer(tmp_path, kl_coef=0.1, vf_coef=0.7, cliprange=0.1, cliprange_value=0.05)
    model = trainer.model
    _perturb_lora(model)
    rollout = trainer._experience(
        _fixed_batch(trainer), torch.tensor([1.0, 0.0, -1.0, 2.0]),
        torch.zeros(4, 1), torch.zeros(4, dtype=torch.bool),
    )  # fmt: skip
    _perturb_lora(model, scale=0.35)  # the policy moved since the rollout: ratios != 1
    mb = trainer._micro_batch(rollout, 0)
    calls = {"backbone": 0, "value_head": 0, "lm_head": 0}
    base = model.get_base_model()

    def counter(name):
        return lambda *args: calls.__setitem__(name, calls[name] + 1)

    modules = {"backbone": base.model, "value_head": model.value_head, "lm_head": base.lm_head}
    hooks = [m.register_forward_hook(counter(name)) for name, m in modules.items()]
    model.train()
    loss = trainer.compute_loss(model, mb)
    for hook in hooks:
        hook.remove()
    assert calls == {"backbone": 1, "value_head": 1, "lm_head": 0}
    # the same loss, computed independently
    mask = mb["completion_mask"]
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    att = torch.cat([mb["prompt_mask"], mask], 1)
    h = completion_positions(last_hidden_states(model, ids, att), mb["prompt_ids"].shape[1])
    targets = torch.where(mask.bool(), mb["completion_ids"], -100)
    logps = linear_logprobs(h, base.lm_head.weight, targets)
    pg, _ = policy_loss(logps, mb["old_logps"], mb["advantages"], mask, loss_type="bnpo",
                        epsilon=0.1)  # fmt: skip
    vf, _ = value_loss(model.value_head(h).squeeze(-1), mb["old_values"], mb["returns"], mask,
                       value_clip=0.05)  # fmt: skip
    torch.testing.assert_close(loss, pg + 0.7 * vf)
    assert (logps - mb["old_logps"]).abs().max() > 1e-3


def test_save_and_reload_the_value_head(tmp_path):
    from peft import PeftModel

    trainer = _trainer(tmp_path / "run", max_steps=1)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_model.safetensors").exists() and (out / VALUE_HEAD_NAME).exists()
    tok = build_tiny_tokenizer()
    reloaded = PeftModel.from_pretrained(build_tiny_model(tok, "test", seed=0), str(out))
    head = load_value_head(reloaded, out)
    torch.testing.assert_close(head.weight, trainer.model.value_head.weight)
    torch.testing.assert_close(head.bias, trainer.model.value_head.bias)
    with pytest.raises(FileNotFoundError, match=VALUE_HEAD_NAME):
        load_value_head(reloaded, tmp_path)


def test_resume_mid_rollout_ends_where_an_uninterrupted_run_ends(tmp_path):
    # 2 mini-batches per rollout: checkpoint-1 is in the middle of the first rollout
    full = _trainer(tmp_path / "full", max_steps=2, save_strategy="steps", save_steps=1)
    full.train()
    ckpt = tmp_path / "full" / "checkpoint-1"
    assert (ckpt / VALUE_HEAD_NAME).exists() and (ckpt / "ppo_rollout.pt").exists()
    resumed = _trainer(tmp_path / "resumed", max_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    ends = [{n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad}
            for t in (full, resumed)]  # fmt: skip
    assert any("value_head" in n for n in ends[0])
    for name, value in ends[0].items():
        torch.testing.assert_close(ends[1][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    ("option", "value", "match"),
    [
        ("num_ppo_epochs", 0, "--num_ppo_epochs must be >= 1"),
        ("kl_coef", -0.1, "--kl_coef must be >= 0"),
        ("kl_estimator", "k2", "--kl_estimator must be one of 'k1', 'k3'"),
        ("cliprange", 0.0, "--cliprange must be > 0"),
        ("lam", 1.5, "--lam must be in"),
        ("stop_token", None, "--stop_token None is not supported"),
        ("cliprange_value", -1.0, "--cliprange_value must be > 0"),
    ],
)
def test_bad_options(tmp_path, option, value, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **{option: value})


def test_bad_trainer_inputs(tmp_path):
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(build_tiny_model(build_tiny_tokenizer(), "test"), letter_share,
                   args=object(), train_dataset=[{"prompt": "a"}])  # fmt: skip
    # 8 prompts needed, 4 given: refused when the trainer is built, naming the flags
    with pytest.raises(ValueError, match="fewer than one PPO rollout.*--num_mini_batches 2"):
        _trainer(tmp_path, per_device_train_batch_size=4)
    none_reward = _trainer(
        tmp_path, reward_funcs=lambda prompts, completions, **kw: [None] * len(completions)
    )
    with pytest.raises(ValueError, match="PPO needs a score"):
        none_reward.train()


def test_response_length_is_max_completion_length(tmp_path):
    assert _args(tmp_path, response_length=7).max_completion_length == 7


class TinyRewardModel(torch.nn.Module):
    """A reward model as a reward function: scores the completion token ids."""

    __name__ = "tiny_reward_model"

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(97, 1)
        self.calls = 0

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls += 1
        return [self.embed(torch.tensor(ids) % 97).sum().item() if ids else 0.0
                for ids in completion_ids]  # fmt: skip


def test_reward_model_callable(tmp_path):
    rm = TinyRewardModel()
    trainer = _trainer(tmp_path, reward_funcs=rm, max_steps=1)
    trainer.train()
    assert rm.calls == 1
    keys = {k for e in trainer.state.log_history for k in e}
    assert "rewards/tiny_reward_model/mean" in keys


def test_each_epoch_trains_on_every_rollout_row_once(tmp_path):
    trainer = _trainer(tmp_path, num_ppo_epochs=3, num_mini_batches=2)
    batch = _fixed_batch(trainer)
    rollout = trainer._experience(batch, torch.zeros(4), torch.zeros(4, 1), torch.zeros(4).bool())
    assert trainer._cycle == 6  # 3 epochs x 2 mini-batches x 1 accumulation step
    orders = []
    for epoch in range(3):
        rows = []
        for j in range(2):
            mb = trainer._micro_batch(rollout, epoch * 2 + j)
            width = int(mb["completion_mask"].sum(1).max())
            assert mb["completion_ids"].shape[1] == width  # trimmed to its longest
            for ids in mb["prompt_ids"]:
                rows.append(next(i for i in range(4) if torch.equal(batch["prompt_ids"][i], ids)))
        assert sorted(rows) == [0, 1, 2, 3]
        orders.append(rows)
    assert len({tuple(o) for o in orders}) > 1  # shuffled per epoch


# ---------------------------------------------------------------- several processes


class FixedCompletions(PPOTrainer):
    """Completions that depend on the prompt only, all `max_completion_length` long (never
    EOS): one process and two sample the same ones, and every rank's rollout has as many
    completion tokens, so DDP's mean of the ranks' token-mean gradients is the one
    process's token mean (PPO's per-micro-batch token mean, as TRL's, weighs each rank's
    batch equally)."""

    def _generate(self, prompt_ids, prompt_mask):
        j = torch.arange(self.args.max_completion_length, device=prompt_ids.device)
        key = (prompt_ids * prompt_mask).sum(1, keepdim=True)
        return 4 + (7 * key + 5 * j) % 90  # character tokens (4..93), never <eos>


DDP_PROMPTS = ["12+7=", "30-4=", "5+5=", "81-9=", "2*3=", "44+1=", "9-8=", "70+6="]


def ppo_ddp_trainer(out, world: int, **overrides) -> PPOTrainer:
    """A global batch of 4 prompts per rollout (2 per rank on two processes), 2 epochs
    of one mini-batch each, 3 SGD steps: two rollouts, the reference pass on, both
    whitenings on."""
    tok = build_tiny_tokenizer()
    extra = dict(ddp_backend="gloo") if world > 1 else {}
    args = PPOConfig(
        output_dir=str(out), per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=2,
        max_completion_length=5, max_steps=3, optim="sgd", learning_rate=1.0, kl_coef=0.2,
        whiten_rewards=True, vf_coef=0.5, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, disable_tqdm=True, temperature=1.0,
        activation_checkpointing=False, **{**extra, **overrides},
    )  # fmt: skip
    return FixedCompletions(
        build_tiny_model(tok, "test", seed=0), letter_share, args=args,
        train_dataset=[{"prompt": p} for p in DDP_PROMPTS], processing_class=tok,
    )  # fmt: skip


def trained_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


DDP_SCRIPT = """
from tests.trainers.test_ppo_trainer import ppo_ddp_trainer, trained_weights
trainer = ppo_ddp_trainer({out!r}, world=2)
trainer.train()
assert trainer.state.global_step == 3
if dist.get_rank() == 0:
    torch.save({{"weights": trained_weights(trainer.model), "logs": trainer.state.log_history}},
               os.path.join(os.path.dirname({out!r}), "rank0.pt"))
"""

# metrics that are means (or sums) over the whole global batch
GLOBAL_METRICS = ("loss", "objective/scores", "objective/kl", "objective/rlhf_reward",
                  "loss/policy_avg", "loss/value_avg", "val/ratio", "num_tokens")  # fmt: skip


@pytest.mark.slow
def test_data_parallel_matches_one_process(tmp_path):
    assert_ranks_end_equal(DDP_SCRIPT, tmp_path, also=("value_head",))
    ranks = torch.load(tmp_path / "rank0.pt", weights_only=True)
    single = ppo_ddp_trainer(tmp_path / "single", world=1)
    before = trained_weights(single.model)
    single.train()
    want = trained_weights(single.model)
    assert set(ranks["weights"]) == set(want) and any("value_head" in n for n in want)
    for kind in ("lora_", "value_head"):
        moved = max(float((want[n] - before[n]).abs().max()) for n in want if kind in n)
        assert moved > 1e-2, (kind, moved)  # the steps did train both
    for name, value in want.items():
        # summation order differs (two half-batch gradients averaged vs one batch)
        torch.testing.assert_close(ranks["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    logs = [[e for e in run if "loss" in e] for run in (ranks["logs"], single.state.log_history)]
    assert len(logs[0]) == len(logs[1]) == 3
    compared = 0
    for got, expected in zip(*logs, strict=True):
        # the rollout's metrics are in the logs of the steps that sampled one (1 and 3)
        assert set(got) == set(expected), set(got) ^ set(expected)
        for key in set(GLOBAL_METRICS) & set(expected):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
            compared += 1
    assert compared == 2 * len(GLOBAL_METRICS) + 5, compared  # step 2: the step's own 5


def test_the_value_head_runs_inside_the_wrappers_forward(tmp_path):
    """What makes DDP reduce its gradient (and find it with find_unused_parameters): the
    value head is called while the engine's wrapper runs its forward."""
    trainer = _trainer(tmp_path)
    model = trainer.model
    rollout = trainer._experience(
        _fixed_batch(trainer), torch.tensor([1.0, 0.0, -1.0, 2.0]),
        torch.zeros(4, 1), torch.zeros(4, dtype=torch.bool),
    )  # fmt: skip

    class Wrapper(torch.nn.Module):  # as DDP: a module around the peft model
        def __init__(self, inner):
            super().__init__()
            self.module, self.inside = inner, False

        def forward(self, *args, **kwargs):
            self.inside = True
            try:
                return self.module(*args, **kwargs)
            finally:
                self.inside = False

    wrapper = Wrapper(model)
    seen = []
    hook = model.value_head.register_forward_hook(lambda *a: seen.append(wrapper.inside))
    model.train()
    loss = trainer.compute_loss(wrapper, trainer._micro_batch(rollout, 0))
    hook.remove()
    assert seen == [True]
    loss.backward()
    assert model.value_head.weight.grad.abs().sum() > 0


def test_fsdp1_is_refused_naming_the_option():
    """FSDP2 and ZeRO-3 run (tests/trainers/test_sharded_ppo.py); FSDP1 stays refused, as
    for every trainer, naming the option that selects FSDP2."""
    from types import SimpleNamespace

    from fastrl.trainers.model import refuse_sharded_parameters

    trainer = object.__new__(PPOTrainer)  # only what the check reads
    plugin = SimpleNamespace(fsdp_version=1)
    trainer.__dict__.update(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        args=SimpleNamespace(),
    )
    with pytest.raises(ValueError, match=r"PPOTrainer supports FSDP2 only .*'version': 2"):
        refuse_sharded_parameters(trainer)
    plugin.fsdp_version = 2
    refuse_sharded_parameters(trainer)
