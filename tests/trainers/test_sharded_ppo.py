"""PPOTrainer under FSDP2 (`fully_shard` through accelerate) and DeepSpeed ZeRO-3, on two
CPU processes (gloo; `tests.support.ranks.FSDP_ON_CPU` / `DEEPSPEED_ON_CPU`).

Two processes with half the prompts each end with the LoRA and value-head weights (and the
rollout and loss metrics) one process ends with on all of them, as
`test_ppo_trainer.test_data_parallel_matches_one_process` for DDP (same tolerances; SGD):
the value head is a sharded parameter of the root module (an FSDP2 `DTensor`, uneven: one
process holds its one row; a ZeRO-3 partition), whole inside the forward (checked by a
hook) and its gradient reduce-scattered (reduced into the partitions), the model loaded
from a checkpoint (ZeRO-3 partitions it as it loads), each rollout generated with
`generate` on the sharded model, the old-policy and reference passes run on it, and both
whitenings taken over both processes' rollouts. The value head a sharded run saves
(`save_model`, and each step's checkpoint) is the whole `[1, d]` one and equals the
one-process run's; `load_value_head` copies a saved head into FSDP2 shards (and refuses a
ZeRO-3 partition: DeepSpeed's checkpoint restores it); a sharded run resumed from its
step-1 checkpoint ends where the one-process run ends.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from fastrl.trainers import PPOConfig  # noqa: E402
from fastrl.trainers.ppo_trainer import VALUE_HEAD_NAME  # noqa: E402
from fastrl.trainers.rollout import RolloutMixin  # noqa: E402
from tests.support.ranks import DEEPSPEED_ON_CPU, EXIT, FSDP_ON_CPU, run_ranks  # noqa: E402
from tests.support.rollouts import letter_share  # noqa: E402
from tests.trainers.test_ppo_trainer import (  # noqa: E402
    DDP_PROMPTS,
    GLOBAL_METRICS,
    FixedCompletions,
)
from tests.trainers.test_sharded import ENGINES, _whole  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


class GeneratedThenFixed(FixedCompletions):
    """Samples with `generate` on the (sharded) model, then trains on `FixedCompletions`'
    completions: generation runs as in training, the rollout does not depend on it."""

    generated = 0

    def _generate(self, prompt_ids, prompt_mask):
        sampled = RolloutMixin._generate(self, prompt_ids, prompt_mask)
        assert sampled.shape[0] == prompt_ids.shape[0]
        self.generated += 1
        return super()._generate(prompt_ids, prompt_mask)


def ppo_sharded_trainer(out, world: int, model: str, engine: str | None = None, **overrides):
    """PPO on the checkpoint `model`: 4 prompts per rollout (2 per process on two), one
    epoch of one mini-batch, 2 SGD steps: two rollouts (the second sampled and scored by
    the updated sharded model), the reference pass and both whitenings on, a checkpoint
    after each step."""
    tok = build_tiny_tokenizer()
    extra = dict(ddp_backend="gloo", **ENGINES[engine]) if world > 1 else dict(use_cpu=True)
    options = dict(
        output_dir=str(out), per_device_train_batch_size=4 // world,
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        max_completion_length=5, max_steps=2, learning_rate=1.0, kl_coef=0.2,
        # SGD with momentum: a state for the checkpoint to carry (torch's loader of a
        # sharded optimizer state fails on an empty one), linear in the gradients (no Adam
        # sign of a rounding error)
        optim="sgd", optim_args="momentum=0.5",
        whiten_rewards=True, vf_coef=0.5, logging_steps=1, report_to="none",
        save_strategy="steps", save_steps=1, seed=0, disable_tqdm=True, temperature=1.0,
        activation_checkpointing=False, **extra,
    )  # fmt: skip
    args = PPOConfig(**{**options, **overrides})
    return GeneratedThenFixed(
        model, letter_share, args=args,
        train_dataset=[{"prompt": p} for p in DDP_PROMPTS], processing_class=tok,
    )  # fmt: skip


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA and value-head weights, whole (every process calls it under sharding)."""
    return {
        n: _whole(p).detach().clone()
        for n, p in model.named_parameters()
        if "lora_" in n or "value_head" in n
    }


SCRIPT = """
from fastrl.integrations import is_sharded
from tests.trainers.test_sharded_ppo import ppo_sharded_trainer, trained_weights
engine = {engine!r}
base = {base!r}  # a checkpoint: under ZeRO-3 from_pretrained partitions it as it loads
trainer = ppo_sharded_trainer({out!r} + "/run", 2, base, engine=engine)
if engine == "zero3":
    assert trainer.model.get_input_embeddings().weight.numel() == 0
assert trainer.is_fsdp_enabled if engine == "fsdp2" else trainer.is_deepspeed_enabled
model = trainer.accelerator.unwrap_model(trainer.model)
seen = []  # the value head's weight as its forward sees it: whole, gathered from shards
hook = model.value_head.register_forward_hook(
    lambda m, args, out: seen.append((is_sharded(m.weight), tuple(m.weight.shape)))
)
trainer.train()
hook.remove()
assert trainer.state.global_step == 2 and trainer.generated == 2
d = model.get_base_model().config.hidden_size
# per step: the old-policy pass (the reference pass runs without it) and the loss's forward
assert seen == [(engine == "zero3", (1, d))] * 4, seen
model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
if engine == "fsdp2":
    from torch.distributed.fsdp import FSDPModule
    assert isinstance(trainer.model_wrapped, FSDPModule)
else:
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    assert model.value_head.weight.numel() == 0  # partitioned
# between steps the engine keeps shards only: the value head's too
assert is_sharded(model.value_head.weight) and is_sharded(model.value_head.bias)
weights = trained_weights(model)
trainer.save_model({out!r} + "/saved")
dist.barrier()  # rank 0 has written it
import pytest
from safetensors.torch import load_file, save_file
from fastrl.trainers.ppo_trainer import load_value_head
if engine == "zero3":  # DeepSpeed's checkpoint restores it; a copy would miss the optimizer's
    with pytest.raises(ValueError, match="ZeRO-3 partitioned value head"):
        load_value_head(model, {out!r} + "/saved")
else:
    # FSDP2: into the shards, from the whole saved heads (step 1's, then the last one)
    from fastrl.trainers.ppo_trainer import value_head_state
    step1 = load_file({out!r} + "/run/checkpoint-1/value_head.safetensors")
    load_value_head(model, {out!r} + "/run/checkpoint-1")
    assert is_sharded(model.value_head.weight)
    for name, value in value_head_state(model).items():
        assert torch.equal(value, step1[name]), name
    load_value_head(model, {out!r} + "/saved")
    assert torch.equal(trained_weights(model)["value_head.weight"], weights["value_head.weight"])
    # a sharded head cannot be replaced by one of another shape
    wrong = {out!r} + f"/wrong{{dist.get_rank()}}"
    os.makedirs(wrong)
    d = model.value_head.weight.shape[1]
    save_file({{"weight": torch.zeros(1, d + 1), "bias": torch.zeros(1)}},
              wrong + "/value_head.safetensors")
    with pytest.raises(ValueError, match="of shape .1, 33.; the sharded model's is .1, 32."):
        load_value_head(model, wrong)
# resumed from the first step's checkpoint: the value head comes back (the engines' own
# checkpoints hold it too; under FSDP2 load_value_head copies the file's into the shards)
resumed = ppo_sharded_trainer({out!r} + "/resumed", 2, base, engine=engine)
resumed.train(resume_from_checkpoint={out!r} + "/run/checkpoint-1")
again = trained_weights(resumed.accelerator.unwrap_model(resumed.model_wrapped))
if dist.get_rank() == 0:
    logs = [e for e in trainer.state.log_history if "loss" in e]
    torch.save({{"weights": weights, "resumed": again, "logs": logs}}, {out!r} + "/weights.pt")
print("TRAINED", dist.get_rank(), flush=True)
"""


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The checkpoint every run starts from, and the one-process run on all the prompts."""
    root = tmp_path_factory.mktemp("one_process")
    base = root / "base"
    build_tiny_model(build_tiny_tokenizer(), "test", seed=0).save_pretrained(base)
    single = ppo_sharded_trainer(root / "single", 1, str(base), save_strategy="no")
    before = trained_weights(single.model)
    single.train()
    logs = [e for e in single.state.log_history if "loss" in e]
    return SimpleNamespace(base=base, before=before, want=trained_weights(single.model), logs=logs)


def _assert_sharded_ppo_matches_one_process(tmp_path, engine, one):
    from safetensors.torch import load_file

    shim = FSDP_ON_CPU if engine == "fsdp2" else DEEPSPEED_ON_CPU
    script = SCRIPT.format(engine=engine, out=str(tmp_path), base=str(one.base))
    out = run_ranks(shim + script + EXIT, tmp_path)
    assert out.count("TRAINED") == 2, out[-2000:]
    ranks = torch.load(tmp_path / "weights.pt", weights_only=True)

    want = one.want
    assert set(ranks["weights"]) == set(want) and any("value_head" in n for n in want)
    for kind in ("lora_", "value_head"):
        moved = max(float((want[n] - one.before[n]).abs().max()) for n in want if kind in n)
        assert moved > 1e-2, (kind, moved)  # the steps did train both
    for run in ("weights", "resumed"):
        for name, value in want.items():
            # summation order differs (two half-batch gradients averaged vs one batch)
            got = ranks[run][name]
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-6, msg=f"{run} {name}")
    assert len(one.logs) == len(ranks["logs"]) == 2
    for got, expected in zip(ranks["logs"], one.logs, strict=True):  # each step: a rollout
        assert set(got) == set(expected), set(got) ^ set(expected)
        for key in GLOBAL_METRICS:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # the whole value head, written from shards: the final one and step 1's
    d = want["value_head.weight"].shape[1]
    saved = load_file(tmp_path / "saved" / VALUE_HEAD_NAME)
    assert saved["weight"].shape == (1, d) and saved["bias"].shape == (1,)
    torch.testing.assert_close(saved["weight"], want["value_head.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(saved["bias"], want["value_head.bias"], rtol=1e-5, atol=1e-6)
    step1 = load_file(tmp_path / "run" / "checkpoint-1" / VALUE_HEAD_NAME)
    assert step1["weight"].shape == (1, d)
    assert (step1["weight"] - saved["weight"]).abs().max() > 1e-4  # the second step moved it


@pytest.mark.slow
def test_fsdp2_ppo_matches_one_process(tmp_path, one_process):
    _assert_sharded_ppo_matches_one_process(tmp_path, "fsdp2", one_process)


@pytest.mark.slow
def test_zero3_ppo_matches_one_process(tmp_path, one_process):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (an optional extra)")
    _assert_sharded_ppo_matches_one_process(tmp_path, "zero3", one_process)


def test_the_value_head_of_a_model_partitioned_at_load_time():
    """Under ZeRO-3 `from_pretrained` partitions the model as it loads (`zero.Init`): the
    embedding is an empty partition with its whole shape in `ds_shape`, and the value head
    built on it is still `[1, d]`."""
    from fastrl.trainers.ppo_trainer import add_value_head

    model = build_tiny_model(build_tiny_tokenizer(), "test", seed=0)
    embedding = model.get_input_embeddings()
    whole = embedding.weight.shape
    embedding.weight = torch.nn.Parameter(torch.empty(0))
    embedding.weight.ds_shape = whole  # what a ZeRO-3 partition keeps of its shape
    head = add_value_head(model)
    assert head.weight.shape == (1, whole[1]) and model.value_head is head
