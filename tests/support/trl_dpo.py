"""TRL's DPO, KTO and CPO trainers around the tiny model: the batches their collators
make (with hand-made reference log-probs), the attributes each case sets, the
`preference_loss` options that match them, and a spy on the step
(tests/parity/test_trl_parity_dpo.py tells how the parity is checked)."""

import torch

from fastrl import sequence_logprobs
from tests.support.args import cpu_args
from tests.support.compare import TOL_SAME_LOGPS
from tests.support.models import V, tiny_model

# Six pairs: prompt, chosen and rejected lengths in tokens (before the EOS-free ids below).
# Unequal within each pair both ways (LD-DPO's tail is on either side), one pair of equal
# length, one single-token completion.
PROMPT_LENS = [2, 3, 1, 4, 2, 3]
CHOSEN_LENS = [3, 1, 5, 4, 2, 6]
REJECTED_LENS = [2, 4, 5, 1, 6, 3]
B = len(PROMPT_LENS)
# Model-side metrics TRL logs besides the loss's: not functions of sequence log-probs.
MODEL_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy"}


def _common_args(tmp, batch_size=B):
    """The TrainingArguments options of every trainer here: CPU, float32, no saving."""
    return cpu_args(
        tmp,
        per_device_train_batch_size=batch_size,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
    )


def _ref_model():
    """The tiny Llama with perturbed weights: a reference that differs from the policy."""
    model = tiny_model()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return model


PAIRED_DS = dict(
    prompt=["w1 w2", "w3", "w4 w5 w6", "w7"],
    chosen=[" w8 w9", " w10 w11 w12", " w13", " w14 w15 w16 w17"],
    rejected=[" w18", " w19 w20", " w21 w22 w23", " w24 w25"],
)


def _spy_forward(monkeypatch, model):
    """Record the outputs of every forward call of `model`."""
    calls = []
    real = model.forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(model, "forward", spy)
    return calls


def _check_metrics(ours, theirs, skip=MODEL_METRICS, tol=TOL_SAME_LOGPS):
    """Every metric TRL logged, under the same name, but the model-side ones."""
    theirs = {k: v for k, v in theirs.items() if k not in skip}
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for name, value in theirs.items():
        want = torch.as_tensor(value, dtype=torch.float32)
        torch.testing.assert_close(ours[name].float(), want, **tol, msg=name)


# --------------------------------------------------------------------------- DPO


def _dpo_batch(trainer, seed, *, ref_noise=3.0):
    """A batch from TRL's collator, with hand-made reference log-probs (TRL reads them from
    the batch when `precompute_ref_logps` is set): the policy's own plus noise, so that the
    log-ratios spread over both signs."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    examples = [
        {"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
        for p, c, r in zip(PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS, strict=True)
    ]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        logps = _own_sequence_logps(trainer.model, batch)
    ref = logps + ref_noise * torch.randn(2 * B, generator=g)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref.chunk(2)
    return batch


def _own_sequence_logps(model, batch):
    """Summed completion log-probs from the full logits (fastrl's own sequence_logprobs)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    lp = lp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return sequence_logprobs(lp, batch["completion_mask"][:, 1:])


def _configure_dpo(
    trainer,
    loss_type="sigmoid",
    *,
    beta=0.1,
    loss_weights=None,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    ld_alpha=None,
    use_weighting=False,
    precompute=True,
):
    """Set what DPOTrainer._compute_loss reads at call time (TRL 1.16's attribute names)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.loss_types = types
    trainer.loss_weights = loss_weights or [1.0] * len(types)
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.f_divergence_type = f_divergence_type
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.args.discopop_tau = discopop_tau
    trainer.ld_alpha = ld_alpha
    trainer.use_weighting = use_weighting
    trainer.precompute_ref_logps = precompute
    trainer.model.train()
    trainer._metrics["train"].clear()


def _fastrl_dpo_kwargs(trainer):
    """The preference_loss options that correspond to the trainer's configuration."""
    kw = dict(
        loss_type=list(trainer.loss_types),
        loss_weights=list(trainer.loss_weights),
        beta=trainer.beta,
        label_smoothing=trainer.label_smoothing,
        f_divergence_type=trainer.f_divergence_type,
        ld_alpha=trainer.ld_alpha,
        use_weighting=trainer.use_weighting,
    )
    if trainer.f_divergence_type == "alpha_divergence":
        kw["f_alpha_divergence_coef"] = trainer.f_alpha_divergence_coef
    if "discopop" in trainer.loss_types:
        kw["discopop_tau"] = trainer.args.discopop_tau
    return kw


def _dpo_step(trainer, batch, monkeypatch):
    """TRL's loss, the policy's and the reference's fused-head outputs, and TRL's metrics."""
    policy_calls = _spy_forward(monkeypatch, trainer.model)
    ref_calls = _spy_forward(monkeypatch, trainer.ref_model)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    monkeypatch.undo()
    assert len(policy_calls) == 1
    assert len(ref_calls) == (0 if trainer.precompute_ref_logps else 1)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, policy_calls[0], (ref_calls[0] if ref_calls else None), metrics


# --------------------------------------------------------------------------- KTO

KTO_PROMPT_LENS = [2, 3, 1, 4, 2, 3, 2]
KTO_COMPLETION_LENS = [3, 1, 5, 4, 2, 6, 3]


def _kto_batch(trainer, seed, labels, *, kl_shift=0.0):
    """TRL's collator on unpaired examples; the KL completions rotated by one as TRL's
    dataset preparation rotates them; reference log-probs hand-made (precompute)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    prompts = [ids(n) for n in KTO_PROMPT_LENS]
    completions = [ids(n) for n in KTO_COMPLETION_LENS]
    kl_completions = [completions[-1]] + completions[:-1]
    examples = [
        {"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": bool(lab)}
        for p, c, k, lab in zip(prompts, completions, kl_completions, labels, strict=True)
    ]
    batch = trainer.data_collator(examples)
    n = len(examples)
    with torch.no_grad():
        lp = _own_sequence_logps(trainer.model, batch)
        kl_batch = {
            "input_ids": batch["KL_input_ids"],
            "attention_mask": batch["KL_attention_mask"],
            "completion_mask": batch["KL_completion_mask"],
        }
        kl_lp = _own_sequence_logps(trainer.model, kl_batch)
    batch["ref_logps"] = lp + 3.0 * torch.randn(n, generator=g)
    # kl_shift > 0 moves the KL estimate up; < 0 makes it negative, clamped to 0 by TRL
    batch["ref_KL_logps"] = kl_lp - kl_shift + 2.0 * torch.randn(n, generator=g)
    return batch


def _configure_kto(trainer, loss_type="kto", *, beta=0.1, weights=(1.0, 1.0), precompute=True):
    trainer.loss_type = loss_type
    trainer.calculate_KL = loss_type != "apo_zero_unpaired"  # set from loss_type at init
    trainer.beta = beta
    trainer.desirable_weight, trainer.undesirable_weight = weights
    trainer.precompute_ref_logps = precompute
    trainer.model.train()
    trainer._metrics["train"].clear()


# --------------------------------------------------------------------------- CPO / SimPO

CPO_NAMES = {"sigmoid": "cpo", "hinge": "cpo_hinge", "ipo": "cpo_ipo", "simpo": "simpo"}


def _configure_cpo(
    trainer, loss_type="sigmoid", *, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, alpha=0.0
):
    """What CPOTrainer reads at call time (simpo_gamma is only set at init for simpo)."""
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.cpo_alpha = cpo_alpha
    trainer.alpha = alpha
    trainer.simpo_gamma = 0.7
    trainer.model.train()


def _fastrl_cpo_kwargs(trainer):
    kw = dict(
        loss_type=CPO_NAMES[trainer.loss_type],
        beta=trainer.beta,
        label_smoothing=trainer.label_smoothing,
        cpo_alpha=trainer.cpo_alpha,
        alpha=trainer.alpha,
    )
    if trainer.loss_type == "simpo":
        kw["simpo_gamma"] = trainer.simpo_gamma
    return kw


def _paired_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
