"""GRPOTrainer on tiny config-built models, CPU.

- a training run changes only the LoRA weights; the model never computes logits for the
  loss (the lm_head is not called, also through a DDP-style wrapper);
- on a fixed generated batch the loss (and its LoRA gradients) equals `fused_policy_loss`
  computed independently and TRL 1.16's `GRPOTrainer._compute_loss` on the same model;
- reference log-probs equal the adapter-free base model's; beta=0 never runs the
  reference; num_iterations=2 trains twice on one generation batch with old log-probs;
- a reward function that raises is named; NaN loss and OOM stop with clear messages;
- resuming from a checkpoint (mid generation cycle and at an epoch boundary) ends with
  the adapter of an uninterrupted run.
"""

import copy
import shutil

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastrl.trainers.grpo_trainer as grpo_mod  # noqa: E402
from fastrl import fused_policy_loss, policy_loss  # noqa: E402
from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import GRPOConfig, GRPOTrainer  # noqa: E402
from fastrl.trainers.grpo_trainer import GroupRepeatSampler  # noqa: E402
from fastrl.trainers.model import backbone_hidden_states  # noqa: E402
from tests.support.args import cpu_args  # noqa: E402
from tests.support.ranks import assert_ranks_end_equal  # noqa: E402
from tests.support.rollouts import PROMPTS, letter_share  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def _args(tmp_path, **overrides):
    kw = dict(
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=1,
        max_completion_length=6,
        max_steps=2,
        learning_rate=5e-2,
        logging_steps=1,
        disable_tqdm=True,
    )
    return GRPOConfig(**cpu_args(tmp_path, **{**kw, **overrides}))


def _trainer(tmp_path, reward_funcs=letter_share, data=None, model=None, **overrides):
    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    model = model if model is not None else build_tiny_model(tok, "test", seed=0)
    data = data if data is not None else [{"prompt": p} for p in PROMPTS]
    args = _args(tmp_path, **overrides)
    return GRPOTrainer(model, reward_funcs, args=args, train_dataset=data, processing_class=tok)


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _rows(prompts, G):
    return [{"prompt": p} for p in prompts for _ in range(G)]


def _perturb_lora(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- training


def test_training_changes_only_lora_weights(tmp_path):
    trainer = _trainer(tmp_path, beta=0.1, gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = []
    for n, p in trainer.model.named_parameters():
        if "lora_" in n:
            changed.append(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), f"{n} is not a LoRA weight but changed"
    assert any(changed)
    head = trainer.model.get_base_model().lm_head.weight
    assert not head.requires_grad
    logs = {k for entry in trainer.state.log_history for k in entry}
    for key in ("reward", "reward_std", "rewards/letter_share/mean", "rewards/letter_share/std",
                "completions/mean_length", "kl", "entropy", "clip_ratio/region_mean",
                "tokens_per_second"):  # fmt: skip
        assert key in logs, key
    assert "peak_memory_gib" not in logs  # CUDA only: no None in the logs
    assert all(v is not None for entry in trainer.state.log_history for v in entry.values())


def test_loss_runs_the_backbone_only(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.train()
    batch = trainer._generate_and_score(_rows(PROMPTS[:1], 4))[0]
    base = trainer.model.get_base_model()
    calls = []
    handle = base.lm_head.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    try:
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert calls == []  # no logits at all
        # through a wrapper (as DDP): the wrapper's forward runs, the head still does not
        wrapper = torch.nn.Module()
        wrapper.forward = lambda **kw: trainer.model(**kw)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        via_wrapper = backbone_hidden_states(wrapper, ids, att, unwrapped=trainer.model)
        direct = backbone_hidden_states(trainer.model, ids, att)
        torch.testing.assert_close(via_wrapper, direct)
        assert calls == []
    finally:
        handle.remove()


def test_generation_batch_layout_and_masks(tmp_path):
    trainer = _trainer(tmp_path, mask_truncated_completions=True, max_completion_length=3)
    trainer.model.train()
    eos = trainer.processing_class.eos_token_id
    micro = trainer._generate_and_score(_rows(PROMPTS[:1], 4))
    assert len(micro) == 1
    mb = micro[0]
    assert mb["prompt_mask"][:, -1].all()  # left padding
    for ids, mask in zip(mb["completion_ids"], mb["completion_mask"], strict=True):
        if (ids == eos).any():  # the mask runs up to and including the first EOS
            first = int((ids == eos).nonzero()[0])
            assert mask[: first + 1].all() and not mask[first + 1 :].any()
        else:  # truncated: masked out (DAPO overlong filtering)
            assert not mask.any()
    assert "old_logps" not in mb and "ref_logps" not in mb  # on-policy, beta=0


def test_conversational_prompts_and_a_checkpoint_path(tmp_path):
    tok = build_tiny_tokenizer(chat_template=True)
    build_tiny_model(tok, "test", seed=0).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=kwargs["answer"])
        return letter_share(None, [c[0]["content"] for c in completions])

    messages = [{"role": "user", "content": "12+7="}]
    torch.manual_seed(0)
    trainer = GRPOTrainer(
        str(tmp_path / "ckpt"), spy, args=_args(tmp_path, max_prompt_length=8),
        train_dataset=[{"prompt": messages, "answer": "19"}],
    )  # fmt: skip
    trainer.model.train()
    mb = trainer._generate_and_score([{"prompt": messages, "answer": "19"}] * 4)[0]
    assert seen["prompts"] == [messages] * 4 and seen["answer"] == ["19"] * 4
    assert all(c[0]["role"] == "assistant" for c in seen["completions"])
    assert mb["prompt_ids"].shape[1] == 8  # "user: 12+7=\nassistant: " cut to its last 8
    assert tok.decode(mb["prompt_ids"][0]) == "istant: "


def test_sampler_repeats_groups_and_depends_on_epoch_only():
    s = GroupRepeatSampler(5, group_size=2, prompts_per_batch=2, repeat=3, seed=7)
    idx = list(s)
    assert len(idx) == len(s) == 2 * 2 * 2 * 3  # the incomplete last chunk is dropped
    first = idx[:4]
    assert first[0] == first[1] and first[2] == first[3] and idx[4:12] == first * 2
    s2 = GroupRepeatSampler(5, group_size=2, prompts_per_batch=2, repeat=3, seed=7)
    assert list(s2) == idx  # a fresh sampler (after a restart) yields the same order
    s.set_epoch(1)
    assert list(s) != idx


# --------------------------------------------------------------------------- the loss


# float32 unit roundoff (round to nearest) and Higham's gamma_n = n u / (1 - n u): a sum or
# dot product of n float32 terms, in any order, is within gamma_{n-1} sum|x_i| of the exact
# value (gamma_n for a dot product: n products and n - 1 additions).
U32 = 2.0**-24


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def _fp32_policy_loss_error_bound(hidden, weight, targets, mask, advantages, old, ref, kw):
    """A first-order bound on |fused_policy_loss in float32 - its exact value| that holds for
    every summation order (thread count, ISA, impl), from this batch's own tensors.

    Two float32 evaluations of the same loss differ by at most twice this. The rounding
    enters in two places, both bounded in float64 from the inputs:

    1. the log-probs, `logp_t = z_t - m - log sum_j exp(z_j - m)` with `z = h @ W.T`:
       each logit is a d-term dot product, |dz_j| <= gamma_d sum_k |h_k W_jk|, and moves
       logp_t by sum_j (onehot_j - p_j) dz_j; the V-term sum of exps adds gamma_{V-1}; the
       elementwise steps (z_j - m, exp, log, + m, z_t - lse) one u each, relative to their
       results. A log-prob error e_t moves the loss by |dL/dlogp_t| e_t (autograd).
    2. the loss from the log-probs: every per-token term carries <= 10 roundings (ratio,
       times A, the k3 KL's exp and two subtractions, times ratio, beta, normaliser...) and
       the aggregation sums <= B*T of them, so gamma_{B*T+10} * sum_t |term_t| (the sum of
       magnitudes, not |L|: advantages are zero-mean per group, the terms cancel); the
       sequence-level ratio exp(mean_t log-ratio) adds the relative error of a T-term mean.
    """
    B, T, d = hidden.shape
    V = weight.shape[0]
    loss_type, beta = kw["loss_type"], kw["beta"]
    if loss_type not in ("grpo", "dr_grpo", "dapo", "cispo"):
        raise NotImplementedError(f"no per-token term bound for loss_type={loss_type!r}")
    h = hidden.detach().double().reshape(-1, d)
    w = weight.detach().double()
    z = h @ w.T
    p = z.softmax(-1)
    zmax = z.amax(-1)
    lse = z.logsumexp(-1)
    t = targets.reshape(-1, 1)
    lp = z.gather(-1, t).squeeze(-1) - lse
    onehot = torch.zeros_like(z).scatter_(-1, t, 1.0)
    logit_err = _gamma(d) * ((onehot - p).abs() * (h.abs() @ w.abs().T)).sum(-1)
    elementwise = (p * ((z - zmax[:, None]).abs() + 1)).sum(-1) + (lse - zmax) + lse.abs()
    lp_err = (logit_err + _gamma(V - 1) + U32 * (elementwise + lp.abs())).view(B, T)
    lp = lp.view(B, T)

    m = mask.double()
    old, adv = old.double(), advantages.double().reshape(B, -1)
    ref = None if ref is None else ref.double()
    x = lp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(policy_loss(x, old, adv.squeeze(1), mask, ref_logps=ref, **kw)[0], x)
    from_logps = (g.abs() * lp_err * m).sum()

    # |per-token term| and its weight in the loss (TRL's normalisers)
    n_row = m.sum(1, keepdim=True).clamp(min=1)
    log_ratio = (lp - old) * m
    if kw["importance_sampling_level"] == "sequence":
        log_ratio = (log_ratio.sum(1, keepdim=True) / n_row).expand(B, T)
        ratio_err = _gamma(T + 1) * ((lp - old).abs() * m).sum(1, keepdim=True) / n_row
    else:
        ratio_err = U32 * log_ratio.abs()
    r = log_ratio.exp()
    eps_high = kw["epsilon_high"]
    if loss_type == "cispo":  # -min(r, eps_high) A logp
        term = r.clamp(max=eps_high) * adv.abs() * lp.abs()
    else:  # -min(r A, clip(r) A): at most |A| max(r, 1 + eps_high)
        term = adv.abs() * r.clamp(min=1 + eps_high)
    if beta:  # beta r k3, k3 = exp(ref - logp) - (ref - logp) - 1: the magnitudes it adds up
        dk = ref - lp
        term = term + beta * r * (dk.exp() + dk.abs() + 1)
    GA, spg = kw["gradient_accumulation_steps"], kw["steps_per_generation"]
    if loss_type == "grpo":
        weight_t = 1.0 / (B * n_row * GA)
    elif loss_type == "dr_grpo":
        weight_t = 1.0 / (B * kw["max_completion_length"] * GA)
    else:
        weight_t = spg / (float(kw["num_items_in_batch"]) * GA)
    terms = weight_t * term * m
    from_loss = _gamma(B * T + 10) * terms.sum() + (terms * ratio_err).sum()
    return float(from_logps + from_loss)


@pytest.fixture(scope="module")
def trl_grpo(tmp_path_factory):
    from tests.support.trl_grpo import _grpo_trainer

    return _grpo_trainer(tmp_path_factory.mktemp("trl"))


@pytest.mark.parametrize(
    "loss_type,beta,level",
    [("dapo", 0.04, "token"), ("grpo", 0.0, "token"), ("dr_grpo", 0.04, "sequence"),
     ("cispo", 0.0, "token")],
)  # fmt: skip
def test_loss_matches_fused_policy_loss_and_trl(tmp_path, trl_grpo, loss_type, beta, level):
    from tests.support.compare import TOL_OWN_LOGPS, _assert_grads_close
    from tests.support.models import tiny_model, tiny_tokenizer
    from tests.support.trl_grpo import GA, MAX_LEN, SPG, _configure

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c.split()) % 5) for c in completions]

    tok = tiny_tokenizer()
    args = _args(
        tmp_path,
        gradient_accumulation_steps=GA,
        steps_per_generation=SPG,
        max_completion_length=MAX_LEN,
        loss_type=loss_type,
        beta=beta,
        importance_sampling_level=level,
        epsilon_high=0.28,
        activation_checkpointing=False,
    )
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"]
    torch.manual_seed(0)
    trainer = GRPOTrainer(
        tiny_model(), length_reward, args=args, train_dataset=[{"prompt": p} for p in prompts],
        processing_class=tok,
    )  # fmt: skip
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = GA
    micro = trainer._generate_and_score(_rows(prompts, 4))
    assert len(micro) == SPG and "old_logps" in micro[0]  # GA % SPG != 0: old log-probs
    assert ("ref_logps" in micro[0]) == (beta != 0)
    _perturb_lora(model)  # as after an optimizer step: ratios away from 1
    mb = next(m for m in micro if (m["advantages"] != 0).any())

    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, mb)
    grads = torch.autograd.grad(loss, params)

    # 1. fused_policy_loss on hidden states computed independently
    P = mb["prompt_ids"].shape[1]
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    att = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
    # positions counted from each row's first real token, as generate numbers a left-padded
    # prompt. HF's default (0..L-1) shifts them; RoPE is invariant to the shift only up to
    # rounding, and this batch's logits (lm_head x 40) turn that into ~1e-6 of the loss.
    positions = (att.long().cumsum(1) - 1).clamp(min=0)
    backbone = model.get_base_model().model
    hidden = backbone(input_ids=ids, attention_mask=att, position_ids=positions).last_hidden_state
    kw = dict(
        loss_type=loss_type, beta=beta, importance_sampling_level=level, epsilon=0.2,
        epsilon_high=0.28, max_completion_length=MAX_LEN, gradient_accumulation_steps=GA,
        steps_per_generation=SPG, num_items_in_batch=mb["num_items_in_batch"],
    )  # fmt: skip
    ref = mb.get("ref_logps")
    head_inputs = (
        hidden[:, P - 1 : -1], model.get_base_model().lm_head.weight, mb["completion_ids"],
        mb["completion_mask"], mb["advantages"],
    )  # fmt: skip
    expected, _ = fused_policy_loss(*head_inputs, old_logps=mb["old_logps"], ref_logps=ref, **kw)
    # Same float32 math on the same inputs; only the summation order may differ (thread
    # count, ISA, impl), so twice the order-independent rounding bound of one evaluation.
    bound = _fp32_policy_loss_error_bound(*head_inputs, mb["old_logps"], ref, kw)
    # Here 3.3e-5 (dapo), 3.5e-5 (grpo), 1.1e-4 (dr_grpo: one token's KL term is
    # exp(ref - logp) ~ e^20, so the loss carries that token's log-prob rounding) and
    # 1.7e-4 (cispo: its terms cancel to 1/8 of their magnitudes) of |loss|. A bound that
    # grew past 2e-4 would no longer test anything.
    assert 2 * bound < 2e-4 * expected.abs()
    torch.testing.assert_close(loss, expected, rtol=0, atol=2 * bound)

    # 2. TRL's GRPOTrainer._compute_loss on the same batch and the same (LoRA) model
    _configure(trl_grpo, loss_type=loss_type, level=level, beta=beta, epsilon_high=0.28)
    trl_inputs = {
        "prompt_ids": mb["prompt_ids"], "prompt_mask": mb["prompt_mask"],
        "completion_ids": mb["completion_ids"], "completion_mask": mb["completion_mask"],
        "advantages": mb["advantages"], "old_per_token_logps": mb["old_logps"],
        "num_items_in_batch": mb["num_items_in_batch"],
    }  # fmt: skip
    if ref is not None:
        trl_inputs["ref_per_token_logps"] = ref
    # TRL 1.16 scores through a fused head it patches into the model it trains
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model(), temperature=1.0, outputs=("log_probs", "entropy"))
    trl_loss = trl_grpo._compute_loss(model, trl_inputs)
    torch.testing.assert_close(loss, trl_loss, **TOL_OWN_LOGPS)
    _assert_grads_close(grads, torch.autograd.grad(trl_loss, params), TOL_OWN_LOGPS)


def test_reference_logps_are_the_adapter_free_base(tmp_path, monkeypatch):
    tok = build_tiny_tokenizer()
    base = build_tiny_model(tok, "test", seed=0)
    base_copy = copy.deepcopy(base).eval()
    trainer = _trainer(tmp_path, model=base, beta=0.1, temperature=0.7)
    model = trainer.model
    _perturb_lora(model)  # the policy now differs from the base
    model.train()
    calls = []
    real = grpo_mod.reference_adapters_off
    monkeypatch.setattr(grpo_mod, "reference_adapters_off", lambda m: calls.append(1) or real(m))
    mb = trainer._generate_and_score(_rows(PROMPTS[:1], 4))[0]
    assert calls == [1]

    P = mb["prompt_ids"].shape[1]
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    att = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
    with torch.no_grad():
        logits = base_copy(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1] / 0.7
        expected = torch.log_softmax(logits.float(), -1)
        expected = expected.gather(-1, mb["completion_ids"][..., None])[..., 0]
        expected = expected * mb["completion_mask"]
        policy = torch.log_softmax(
            model(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1] / 0.7, -1
        )
        policy = policy.gather(-1, mb["completion_ids"][..., None])[..., 0] * mb["completion_mask"]
    torch.testing.assert_close(mb["ref_logps"], expected, rtol=1e-5, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # the adapters matter


def test_beta_zero_never_runs_the_reference(tmp_path, monkeypatch):
    def forbidden(model):
        raise AssertionError("the reference forward ran with beta=0")

    monkeypatch.setattr(grpo_mod, "reference_adapters_off", forbidden)
    trainer = _trainer(tmp_path, beta=0.0, max_steps=1)
    monkeypatch.setattr(trainer.model, "disable_adapter", forbidden)
    trainer.train()
    assert "kl" not in trainer.state.log_history[0]


def test_num_iterations_reuses_the_batch_with_old_logps(tmp_path):
    trainer = _trainer(tmp_path, num_iterations=2, max_steps=2)
    generated, seen = [], []
    real_generate, real_loss = trainer._generate, trainer.compute_loss
    trainer._generate = lambda *a: generated.append(1) or real_generate(*a)

    def spy(model, inputs, **kw):
        seen.append(inputs)
        return real_loss(model, inputs, **kw)

    trainer.compute_loss = spy
    trainer.train()
    assert len(generated) == 1 and len(seen) == 2
    assert seen[0] is seen[1] and "old_logps" in seen[0]
    # the first pass is on-policy (old log-probs of the same weights: ratio 1, no clip)
    assert trainer.state.log_history[0]["clip_ratio/region_mean"] == 0
    assert trainer.state.global_step == 2


def test_dynamic_sampling_drops_flat_groups(tmp_path):
    def first_prompt_only(prompts, completions, **kwargs):
        return [letter_share(None, [c])[0] if p == PROMPTS[0] else 0.5
                for p, c in zip(prompts, completions, strict=True)]  # fmt: skip

    trainer = _trainer(tmp_path, reward_funcs=first_prompt_only, dynamic_sampling=True,
                       gradient_accumulation_steps=2, max_steps=1)  # fmt: skip
    trainer.model.train()
    micro = trainer._generate_and_score(_rows(PROMPTS[:2], 4))
    assert [m["prompt_ids"].shape[0] for m in micro] == [2, 2]  # 4 kept of 8
    assert trainer._metrics["train"]["dynamic_sampling/kept_fraction"] == [0.5]
    # every group flat: the step runs on empty micro-batches and changes nothing
    flat = _trainer(tmp_path, reward_funcs=lambda prompts, completions, **kw: [1.0] * len(prompts),
                    dynamic_sampling=True, max_steps=1)  # fmt: skip
    before = _lora_state(flat.model)
    flat.train()
    after = _lora_state(flat.model)
    assert all(torch.equal(before[n], after[n]) for n in before)


# --------------------------------------------------------------------------- errors


def test_reward_function_that_raises_is_named(tmp_path):
    def bad_reward(prompts, completions, **kwargs):
        raise KeyError("no such column")

    trainer = _trainer(tmp_path, reward_funcs=[letter_share, bad_reward], max_steps=1)
    with pytest.raises(RuntimeError, match="reward function 'bad_reward' raised KeyError"):
        trainer.train()


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=1)
    monkeypatch.setattr(
        grpo_mod, "fused_policy_loss", lambda *a, **k: (torch.tensor(float("nan")), {})
    )
    with pytest.raises(
        FloatingPointError,
        match=r"non-finite GRPO loss at step 0 \(this process: loss nan.*learning_rate",
    ):
        trainer.train()


def test_oom_names_the_settings_to_lower(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    trainer._generate = oom
    with pytest.raises(torch.OutOfMemoryError) as info:
        trainer.train()
    for name in ("num_generations", "max_completion_length", "per_device_train_batch_size"):
        assert name in str(info.value)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        _args(tmp_path, per_device_train_batch_size=3, num_generations=2)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        _args(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        _trainer(tmp_path, loss_type="ppo")
    with pytest.raises(ValueError, match="reward_weights"):
        _trainer(tmp_path, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="kernel_impl must be one of .* got 'cuda'"):
        _args(tmp_path, kernel_impl="cuda")
    with pytest.raises(ValueError, match="stop_strings=.*not supported"):
        _trainer(tmp_path, generation_kwargs={"stop_strings": ["\n"]})
    args = _args(tmp_path)
    assert args.beta == 0.0 and args.loss_type == "dapo" and args.remove_unused_columns is False
    assert args.ddp_find_unused_parameters is False and args.kernel_impl == "auto"
    assert args.activation_checkpointing and args.steps_per_generation == 1


def test_generation_settings_reach_generate(tmp_path):
    trainer = _trainer(tmp_path, temperature=0.7, top_p=0.9, top_k=5, min_p=0.05,
                       repetition_penalty=1.1, generation_kwargs={"eos_token_id": 7})  # fmt: skip
    cfg = trainer.generation_config
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.min_p) == (0.7, 0.9, 5, 0.05)
    assert cfg.repetition_penalty == 1.1 and cfg.do_sample and cfg.use_cache
    assert cfg.max_new_tokens == trainer.args.max_completion_length
    # generation_kwargs' EOS is where completions end (and what "truncated" means)
    assert cfg.eos_token_id == 7 and trainer.eos_token_ids == [7]


def test_cap_cuda_memory(monkeypatch):
    from fastrl.trainers.model import cap_cuda_memory

    assert cap_cuda_memory(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="max_memory_gb=24 has no effect: no CUDA"):
        assert cap_cuda_memory(24) is None
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 96 * 2**30})
    )
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d))
    )
    assert cap_cuda_memory(24) == 0.25 and calls == [(0.25, 0)]


# --------------------------------------------------------------------------- resume


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    # G=4, 4 completions per micro-batch, 2 micro-batches per step, num_iterations=2: a
    # generation cycle is 2 optimizer steps; 2 prompts give 2 steps per epoch, so 3 steps
    # cross an epoch. Checkpoint 1 is mid-cycle (the buffer must come back), checkpoint 2
    # at an epoch boundary.
    config = dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=3,
                  save_strategy="steps", save_steps=1, beta=0.05)  # fmt: skip
    data = [{"prompt": p} for p in PROMPTS[:2]]
    full = _trainer(tmp_path / "full", data=data, **config)
    full.train()
    expected = _lora_state(full.model)
    ckpt = tmp_path / "full"
    assert (ckpt / "checkpoint-1" / "adapter_model.safetensors").exists()
    assert not (ckpt / "checkpoint-1" / "model.safetensors").exists()  # the adapter only
    assert (ckpt / "checkpoint-1" / grpo_mod.BUFFER_NAME).exists()

    for step in (1, 2):
        resumed = _trainer(tmp_path / f"resumed{step}", data=data, **config)
        resumed.train(resume_from_checkpoint=str(ckpt / f"checkpoint-{step}"))
        got = _lora_state(resumed.model)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

    # Ctrl-C in the generation of step 3 saves checkpoint-2, which resumes exactly
    stopped = _trainer(tmp_path / "stopped", data=data, **{**config, "save_strategy": "no"})
    calls, real_generate = [], stopped._generate

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args)

    stopped._generate = interrupt
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    assert (tmp_path / "stopped" / "checkpoint-2").is_dir()
    resumed = _trainer(tmp_path / "after_stop", data=data, **config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "stopped" / "checkpoint-2"))
    got = _lora_state(resumed.model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

    # without the saved buffer, a mid-cycle resume regenerates: a different run
    shutil.copytree(ckpt / "checkpoint-1", tmp_path / "nobuffer")
    (tmp_path / "nobuffer" / grpo_mod.BUFFER_NAME).unlink()
    other = _trainer(tmp_path / "other", data=data, **config)
    other.train(resume_from_checkpoint=str(tmp_path / "nobuffer"))
    got = _lora_state(other.model)
    assert any((got[n] - expected[n]).abs().max() > 1e-6 for n in expected)


DDP_SCRIPT = """
from fastrl.trainers import GRPOConfig, GRPOTrainer
from fastrl.demo.task import arithmetic_dataset, build_tiny_model, build_tiny_tokenizer

def letter_share(prompts, completions, **kwargs):
    return [sum(ch.isalpha() for ch in c) / (1 + len(c)) for c in completions]

tok = build_tiny_tokenizer()
args = GRPOConfig({out!r}, per_device_train_batch_size=4, num_generations=4, max_steps=3,
                  max_completion_length=6, learning_rate=5e-2, beta=0.04, use_cpu=True,
                  save_strategy="no", disable_tqdm=True, ddp_backend="gloo", report_to="none",
                  activation_checkpointing=False)
trainer = GRPOTrainer(build_tiny_model(tok, "test"), letter_share, args=args,
                      train_dataset=arithmetic_dataset(32, 0), processing_class=tok)
trainer.train()
"""


@pytest.mark.slow
def test_data_parallel_ranks_end_with_the_same_weights(tmp_path):
    # each rank generates and scores its own prompts
    assert_ranks_end_equal(DDP_SCRIPT, tmp_path)


@pytest.mark.slow
def test_data_parallel_dynamic_sampling_with_a_rank_left_empty(tmp_path):
    """Rank 0's groups are all flat, so dynamic sampling drops its whole batch: its step
    must still join the gradient all-reduce (it used to wait forever)."""
    script = DDP_SCRIPT.replace(
        "def letter_share(prompts, completions, **kwargs):",
        "def letter_share(prompts, completions, **kwargs):\n"
        "    if dist.get_rank() == 0:\n"
        "        return [1.0] * len(completions)",
    ).replace("activation_checkpointing=False", "activation_checkpointing=False, "
              "dynamic_sampling=True, logging_steps=1")  # fmt: skip
    assert script.count("dynamic_sampling=True") == 1 and "get_rank() == 0" in script
    # the logged kept fraction is merged over the ranks: rank 0 alone kept nothing
    script += """
kept = [e["dynamic_sampling/kept_fraction"] for e in trainer.state.log_history if "loss" in e]
assert len(kept) == 3 and all(k > 0 for k in kept), kept
"""
    assert_ranks_end_equal(script, tmp_path)
