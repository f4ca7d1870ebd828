"""The tiny Llama with LoRA adapters that the DPO and KTO trainer and parity tests train,
and the hand-over of its adapter to a TRL trainer built from a ``peft_config``."""

import pytest
import torch

pytest.importorskip("peft")

from fastrl.trainers.model import load_model  # noqa: E402
from tests.support.models import tiny_model  # noqa: E402

LORA = dict(r=4, lora_alpha=32, target_modules="all-linear")


def lora_model(seed=5):
    """The tiny Llama with LoRA adapters that matter (B != 0): policy != reference."""
    model = load_model(tiny_model(), lora=LORA, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def lora_params(model) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters) by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def share_adapter(lora, ours, theirs) -> None:
    """``theirs`` (a TRL trainer whose model got its LoRA from ``peft_config=LORA``) gets
    the adapter weights of ``lora`` (the model ``ours`` was built from a copy of); both
    trainers' models in training mode."""
    mine = lora_params(lora)
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name])
    ours.model.train()
    theirs.model.train()


def train_changes_only_lora(trainer) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Run ``trainer.train()`` and assert that it changed some parameters, LoRA ones only,
    both ``lora_A`` and ``lora_B``; returns the changed names and the parameters after."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    return changed, after
