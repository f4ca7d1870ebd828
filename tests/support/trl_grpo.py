"""TRL's GRPOTrainer around the tiny model, configured per case, and the inputs and the
`policy_loss` options that match it (tests/parity/test_trl_parity_grpo.py tells how the
parity is checked)."""

import itertools

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from fastrl.options.policy import APPLIES_TO  # noqa: E402
from tests.support.models import V, tiny_model, tiny_tokenizer  # noqa: E402

B, G, P, T = 8, 4, 5, 7  # completions, group size, prompt len, completion len
GA, SPG = 2, 4  # gradient accumulation steps, steps per generation
MAX_LEN = 11  # dr_grpo's max_completion_length
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
#: TRL 1.16's GRPOConfig defaults of vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
VESPO_DEFAULTS = (2.0, 3.0, 3.0, 2.0)
# the loss grid: loss type x importance-sampling level x beta x delta
GRID = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [None, 1.5]))


def _reward_funcs(k):
    def make(i):
        def reward(prompts, completions, **kwargs):
            return kwargs[f"r{i}"]

        reward.__name__ = f"r{i}"
        return reward

    return [make(i) for i in range(k)]


def _common_args(tmp):
    """GRPOConfig options of every trainer here: CPU, float32, `B` completions, no saving."""
    return dict(
        output_dir=str(tmp),
        per_device_train_batch_size=B,
        num_generations=G,
        max_completion_length=MAX_LEN,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        seed=0,
    )


def _grpo_trainer(tmp, **config):
    """A GRPOTrainer around the tiny model; `config`: further GRPOConfig options."""
    args = trl.GRPOConfig(**_common_args(tmp), **config)
    ds = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 2})
    trainer = trl.GRPOTrainer(
        model=tiny_model(),
        reward_funcs=_reward_funcs(3),
        args=args,
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )
    trainer.model.train()
    return trainer


def _configure(
    trainer,
    *,
    loss_type="dapo",
    level="token",
    beta=0.0,
    delta=None,
    epsilon=0.2,
    epsilon_high=0.28,
    top_entropy_quantile=1.0,
    entropy_coef=0.0,
    off_policy_mask_threshold=None,
    use_bias_correction_kl=True,
    sapo=(1.0, 1.05),
    vespo=VESPO_DEFAULTS,
    vllm_mode=None,
    clip=(None, 3.0),
):
    """Set what GRPOTrainer._compute_loss / _generate_and_score_completions read per call.

    Attribute names are TRL 1.16's (GRPOTrainer.__init__ copies most options from args
    onto the trainer; `delta`, `use_bias_correction_kl`, `sapo_temperature_*`,
    `vespo_*` and `steps_per_generation` are read from `trainer.args` at call time).
    """
    trainer.loss_type = loss_type
    trainer.importance_sampling_level = level
    trainer.beta = beta
    trainer.args.delta = delta
    trainer.epsilon_low = epsilon
    trainer.epsilon_high = epsilon_high
    trainer.max_completion_length = MAX_LEN
    trainer.current_gradient_accumulation_steps = GA
    trainer.args.gradient_accumulation_steps = GA
    trainer.args.steps_per_generation = SPG
    trainer.top_entropy_quantile = top_entropy_quantile
    trainer.entropy_coef = entropy_coef
    trainer.use_adaptive_entropy = False
    trainer._entropy_bonus_enabled = entropy_coef != 0.0
    trainer.off_policy_mask_threshold = off_policy_mask_threshold
    trainer.args.use_bias_correction_kl = use_bias_correction_kl
    trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg = sapo
    a = trainer.args
    a.vespo_k_pos, a.vespo_lambda_pos, a.vespo_k_neg, a.vespo_lambda_neg = vespo
    trainer.use_vllm = vllm_mode is not None
    trainer.vllm_importance_sampling_correction = vllm_mode is not None
    trainer.vllm_importance_sampling_mode = vllm_mode or "sequence_mask"
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip
    trainer.model.train()
    trainer._metrics["train"].clear()
    trainer._metrics["eval"].clear()


def _batch(seed):
    """Left-padded prompts, right-padded completions (one of them empty), as TRL builds them."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 3, 4, 5, 2, 5, 4, 3]
    comp_lens = [7, 5, 3, 7, 1, 6, 0, 4]  # a fully masked row, as mask_truncated_completions makes
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.zeros(B, T, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        n = prompt_lens[b]
        prompt_ids[b, P - n :] = torch.randint(3, V, (n,), generator=g)
        prompt_mask[b, P - n :] = 1
        n = comp_lens[b]
        completion_ids[b, :n] = torch.randint(3, V, (n,), generator=g)
        completion_mask[b, :n] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask, g


def _own_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0):
    """Per-token log-probs and entropies of the completion from the full logits.

    `temperature`: the trainer's, which TRL divides the logits by.
    """
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=ids, attention_mask=att).logits[:, P - 1 : -1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def _inputs(trainer, seed, *, adv_shape="B"):
    prompt_ids, prompt_mask, completion_ids, completion_mask, g = _batch(seed)
    with torch.no_grad():
        lp, _ = _own_logps(
            trainer.model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            temperature=trainer.temperature,
        )
    m = completion_mask.float()
    if adv_shape == "B":
        adv = torch.randn(B, generator=g)
        adv[3] = 0.0
    else:
        adv = torch.randn(B, T, generator=g)
    # Off-policy: token log-ratios log(pi / pi_old) of about +-0.3, plus a per-sequence
    # shift. For rows 0-2 the shift has the sign of the advantage, so that the clip is
    # active at the token and at the sequence (GSPO) level whatever the seed.
    shift = 0.4 * torch.randn(B, 1, generator=g)
    shift[:3, 0] = 0.5 * torch.sign(adv.reshape(B, -1)[:3, 0])
    old = (lp - shift - 0.3 * torch.randn(B, T, generator=g)) * m
    ref = (lp + 0.3 * torch.randn(B, T, generator=g)) * m
    n_items = completion_mask.sum() * SPG  # the whole generation batch: SPG such micro-batches
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": n_items,
    }


def _fastrl_kwargs(trainer, inputs):
    """The policy_loss options that correspond to the trainer's current configuration."""
    kw = dict(
        loss_type=trainer.loss_type,
        importance_sampling_level=trainer.importance_sampling_level,
        beta=trainer.beta,
        delta=trainer.args.delta,
        epsilon=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        max_completion_length=trainer.max_completion_length,
        num_items_in_batch=inputs["num_items_in_batch"],
        gradient_accumulation_steps=GA,
        steps_per_generation=SPG,
        top_entropy_quantile=trainer.top_entropy_quantile,
        entropy_coef=trainer.entropy_coef,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        use_bias_correction_kl=trainer.args.use_bias_correction_kl,
        sapo_temperature_pos=trainer.args.sapo_temperature_pos,
        sapo_temperature_neg=trainer.args.sapo_temperature_neg,
        vespo_k_pos=trainer.args.vespo_k_pos,
        vespo_lambda_pos=trainer.args.vespo_lambda_pos,
        vespo_k_neg=trainer.args.vespo_k_neg,
        vespo_lambda_neg=trainer.args.vespo_lambda_neg,
    )
    if trainer.beta != 0:
        kw["ref_logps"] = inputs["ref_per_token_logps"]
    if trainer.use_vllm:
        kw.update(
            sampling_logps=inputs["sampling_per_token_logps"],
            sampling_correction=trainer.vllm_importance_sampling_mode,
            sampling_clip_min=trainer.vllm_importance_sampling_clip_min,
            sampling_clip_max=trainer.vllm_importance_sampling_clip_max,
        )
    if not trainer.model.training:  # TRL's evaluation loss: no accumulation, no split
        kw.update(gradient_accumulation_steps=1, steps_per_generation=1)
    # TRL reads another loss type's options (sapo's temperatures, vespo's Gamma shape) only
    # under that loss type; fastrl refuses them elsewhere, so they are passed where they apply
    for rule in APPLIES_TO:
        if rule.option != "delta" and kw["loss_type"] not in rule.loss_types:
            kw.pop(rule.option)
    return kw


def _trl_step(trainer, inputs, monkeypatch):
    """TRL's loss, the per-token log-probs and entropies it computed, and its metrics."""
    captured = {}
    original = trainer._get_per_token_logps_and_entropies

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        captured["logps"], captured["entropy"] = out[0], out[1]
        return out

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    loss = trainer._compute_loss(trainer.model, inputs)
    monkeypatch.undo()
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss, captured["logps"], captured["entropy"], metrics
