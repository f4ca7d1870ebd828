"""Sharded training: FSDP2 (`fully_shard` through accelerate), DeepSpeed ZeRO-3, and the
gathered lm_head.

- `gathered_weight`: forward and every gradient equal the unsharded weight's (float64
  oracle) on a real two-process FSDP2 `DTensor` (uneven shards), on a real two-process
  ZeRO-3 partitioned parameter (patch_trl's head too, called as TRL calls it; and a
  trainable ZeRO-3 head under a DeepSpeed engine, its gradient reduced into the partitions
  equal to the unsharded one) and on a cast copy; the gathered / cast `[V, d]` tensor is
  not kept by the graph between forward and backward: it is gathered again in the
  backward (counted), where the plain head keeps it;
- `GRPOTrainer` and `DPOTrainer` on two CPU processes under FSDP2, and under ZeRO-3, end
  with the LoRA weights one process ends with on the same global batch (world 2 x batch b
  vs world 1 x batch 2b; SGD, so the comparison is not an Adam sign of a rounding error):
  GRPO with a reference (adapters off), old log-probs (num_iterations=2) and greedy
  `generate` on the sharded model; DPO with a per-batch reference, activation
  checkpointing and a checkpoint whose adapter is the trained one;
- what stays refused (FSDP1, vLLM with sharded parameters) says which option to set.

accelerate 1.15 enables FSDP and DeepSpeed for accelerator devices only; the two-process
runs use `tests.support.ranks.FSDP_ON_CPU` / `DEEPSPEED_ON_CPU` to get them on CPU
processes (gloo). The ZeRO-3 tests need DeepSpeed: the `dev` extra has it (`make venv` builds
it with DS_BUILD_OPS=0), so CI runs them; an environment without it skips them.
"""

import weakref
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from fastrl import linear_logprobs  # noqa: E402
from fastrl.integrations import gathered_weight, is_sharded  # noqa: E402
from fastrl.reference import naive_linear_logprobs  # noqa: E402
from fastrl.trainers.model import refuse_sharded_parameters  # noqa: E402
from tests.support.ranks import (  # noqa: E402
    DEEPSPEED_ON_CPU,
    EXIT,
    FSDP_ON_CPU,
    NO_DEEPSPEED_SHM_BUILD,
    run_ranks,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*remove_unused_columns.*"),
    pytest.mark.filterwarnings("ignore:.*generation flags are not valid.*"),
]

V, D, N = 37, 12, 9  # 37 rows: shards of 19 and 18 on two processes


def _head_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g)
    hidden = torch.randn(N, D, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -100
    return weight, hidden, targets


def _oracle(weight, hidden, targets):
    """float64 log-probs, entropies and d(sum logps + sum entropy)/d hidden."""
    h = hidden.double().requires_grad_()
    logps, ent = naive_linear_logprobs(h, weight.double(), targets, return_entropy=True)
    (logps.sum() + ent.sum()).backward()
    return logps, ent, h.grad


# ---------------------------------------------------------------- gathered_weight


def test_a_whole_weight_is_used_as_it_is():
    weight, _, _ = _head_inputs()
    bias = torch.zeros(V)
    with gathered_weight(weight, bias) as (w, b):
        assert w is weight and b is bias
    assert not is_sharded(weight)


def test_a_cast_copy_is_not_kept_between_forward_and_backward():
    """dtype= casts the weight for the call; the graph keeps a handle that casts it again
    in the backward, so the float64 copy is freed when the block ends."""
    weight, hidden, targets = _head_inputs()
    hidden = hidden.double().requires_grad_()
    with gathered_weight(weight, dtype=torch.float64) as (w, _):
        assert w.dtype == torch.float64 and w is not weight
        logps, ent = linear_logprobs(hidden, w, targets, return_entropy=True, impl="torch")
        copy = weakref.ref(w)
    del w
    assert copy() is None  # the graph holds no [V, d] copy
    (logps.sum() + ent.sum()).backward()
    want_logps, want_ent, want_grad = _oracle(weight, hidden.detach(), targets)
    tol = dict(rtol=1e-6, atol=1e-6)  # float32 outputs (the contract), float64 math
    torch.testing.assert_close(logps.double(), want_logps, **tol)
    torch.testing.assert_close(ent.double(), want_ent, **tol)
    torch.testing.assert_close(hidden.grad, want_grad, **tol)


def test_bad_arguments():
    weight, _, _ = _head_inputs()
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        with gathered_weight(weight.tolist()):
            pass
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        with gathered_weight(weight, [0.0] * V):
            pass
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        with gathered_weight(weight, dtype="float64"):
            pass


DTENSOR_SCRIPT = (
    """
import weakref
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from fastrl import fused_policy_loss, linear_logprobs
from fastrl.integrations import gathered_weight, is_sharded
from tests.trainers.test_sharded import _head_inputs, _oracle

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
weight, hidden, targets = _head_inputs()
sharded = distribute_tensor(weight, mesh, [Shard(0)])
assert is_sharded(sharded) and sharded.to_local().shape[0] == (19, 18)[dist.get_rank()]

gathers = []
full_tensor = DTensor.full_tensor
def counted(self, *args, **kwargs):
    gathers.append(torch.is_grad_enabled())
    return full_tensor(self, *args, **kwargs)
DTensor.full_tensor = counted

# a head that recomputes in the backward: one gather in the forward, one in the backward
h = hidden.clone().requires_grad_()
with gathered_weight(sharded) as (w, _):
    assert type(w) is torch.Tensor and w.shape == (37, 12)
    logps, ent = linear_logprobs(h, w, targets, return_entropy=True, impl="torch")
    copy = weakref.ref(w)
del w
assert copy() is None, "the gathered weight outlived its block"
assert len(gathers) == 1
(logps.sum() + ent.sum()).backward()
assert len(gathers) == 2 and gathers[1] is False, gathers
want_logps, want_ent, want_grad = _oracle(weight, hidden, targets)
tol = dict(rtol=1e-5, atol=1e-5)
torch.testing.assert_close(logps, want_logps.float(), **tol)
torch.testing.assert_close(ent, want_ent.float(), **tol)
torch.testing.assert_close(h.grad, want_grad.float(), **tol)

# the fused policy loss (its torch path recomputes the head in the backward)
h = hidden.clone().view(1, 9, 12).requires_grad_()
t, mask = targets.clamp(min=0).view(1, 9), (targets >= 0).long().view(1, 9)
adv = torch.tensor([0.7])
with gathered_weight(sharded) as (w, _):
    loss, _ = fused_policy_loss(h, w, t, mask, adv, num_items_in_batch=mask.sum(), impl="torch")
loss.backward()
assert len(gathers) == 4 and gathers[3] is False, gathers
h2 = hidden.clone().view(1, 9, 12).requires_grad_()
want, _ = fused_policy_loss(h2, weight, t, mask, adv, num_items_in_batch=mask.sum(), impl="torch")
want.backward()
torch.testing.assert_close(loss, want)
torch.testing.assert_close(h.grad, h2.grad)
print("GATHER_OK", dist.get_rank(), flush=True)
"""
    + EXIT
)


def test_a_dtensor_weight_is_gathered_in_forward_and_backward(tmp_path):
    """Two processes, an FSDP2-style Shard(0) DTensor with uneven shards."""
    out = run_ranks(DTENSOR_SCRIPT, tmp_path)
    assert out.count("GATHER_OK") == 2, out[-2000:]


ZERO3_SCRIPT = (
    NO_DEEPSPEED_SHM_BUILD
    + """
import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from fastrl import linear_logprobs
from fastrl.integrations import gathered_weight, is_sharded
from fastrl.integrations.trl import TRLPatch
from tests.trainers.test_sharded import _head_inputs, _oracle

deepspeed.init_distributed(dist_backend="gloo")
weight, hidden, targets = _head_inputs()
config = {"train_batch_size": 2, "zero_optimization": {"stage": 3,
          "stage3_param_persistence_threshold": 0}}
with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.float32):
    head = torch.nn.Linear(12, 37, bias=False)
w = head.weight.requires_grad_(False)  # frozen, as the trainers keep it
with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
    if dist.get_rank() == 0:
        w.data.copy_(weight)
assert w.ds_status == ZeroParamStatus.NOT_AVAILABLE and w.numel() == 0 and is_sharded(w)
tol = dict(rtol=1e-5, atol=1e-5)
want_logps, want_ent, want_grad = _oracle(weight, hidden, targets)

# without the helper the graph keeps the gathered [V, d] weight until the backward
saved = []
h = hidden.clone().requires_grad_()
with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
    hooks = (lambda t: saved.append(t.shape) or t, lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(*hooks):
        linear_logprobs(h, w, targets, impl="torch")
assert (37, 12) in saved, saved

gathers = []  # the helper's gathers: grad mode on in the forward, off in the backward
class Counted(deepspeed.zero.GatheredParameters):
    def __init__(self, params, *args, **kwargs):
        gathers.append(torch.is_grad_enabled())
        super().__init__(params, *args, **kwargs)
Plain, deepspeed.zero.GatheredParameters = deepspeed.zero.GatheredParameters, Counted

h = hidden.clone().requires_grad_()
with gathered_weight(w) as (full, _):
    assert full.shape == (37, 12)
    logps, ent = linear_logprobs(h, full, targets, return_entropy=True, impl="torch")
del full
assert w.ds_status == ZeroParamStatus.NOT_AVAILABLE and w.numel() == 0
assert gathers == [True]
(logps.sum() + ent.sum()).backward()
assert gathers == [True, False], gathers
torch.testing.assert_close(logps, want_logps.float(), **tol)
torch.testing.assert_close(ent, want_ent.float(), **tol)
torch.testing.assert_close(h.grad, want_grad.float(), **tol)

# patch_trl's head as TRL calls it: inside TRL's gather, backward after it
patch = TRLPatch(original=None, impl="torch")
h = hidden.clone().requires_grad_()
t = targets.clamp(min=0)
with Plain([w], modifier_rank=None):  # TRL's maybe_gather_lm_head_ctx
    logps, ent, *_ = patch.apply(h, w, None, t, 1.0, 128, None, 1.0, ("entropy",))
assert w.numel() == 0 and len(gathers) == 2  # available: not gathered again
(logps.sum() + ent.sum()).backward()
assert gathers[2:] == [False], gathers
want_logps, want_ent, want_grad = _oracle(weight, hidden, t)
torch.testing.assert_close(logps, want_logps.float(), **tol)
torch.testing.assert_close(h.grad, want_grad.float(), **tol)
print("ZERO3_OK", dist.get_rank(), flush=True)
"""
    + EXIT
)


@pytest.mark.slow
def test_a_zero3_weight_is_gathered_in_forward_and_backward(tmp_path):
    """Two processes, a real ZeRO-3 partitioned lm_head (gloo): the fused head and
    patch_trl's backward gather it again (the plain head keeps the gathered copy)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (an optional extra)")
    out = run_ranks(ZERO3_SCRIPT, tmp_path)
    assert out.count("ZERO3_OK") == 2, out[-2000:]


ZERO3_TRAINABLE_SCRIPT = (
    NO_DEEPSPEED_SHM_BUILD
    + """
import deepspeed
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_full_grad
from fastrl.integrations.trl import TRLPatch
from tests.trainers.test_sharded import _head_inputs, _oracle

deepspeed.init_distributed(dist_backend="gloo")
weight, hidden, targets = _head_inputs()
t = targets.clamp(min=0)
patch = TRLPatch(original=None, impl="torch")


# a model whose forward scores tokens as TRL's fused lm_head forward does: the lm_head
# weight read directly, gathered by TRL's maybe_gather_lm_head_ctx (GatheredParameters)
# around the head call, inside the model's forward
class Head(torch.nn.Module):

    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(12, 37, bias=False)

    def forward(self, h):
        w = self.lm_head.weight
        with deepspeed.zero.GatheredParameters([w], modifier_rank=None):
            logps, ent, *_ = patch.apply(h, w, None, t, 0.8, 128, None, 1.0, ("entropy",))
        return logps, ent


config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
          "zero_allow_untested_optimizer": True}
with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.float32):
    model = Head()
w = model.lm_head.weight
with deepspeed.zero.GatheredParameters([w], modifier_rank=0):
    if dist.get_rank() == 0:
        w.data.copy_(weight)
engine, *_ = deepspeed.initialize(
    model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), config=config
)
assert w.requires_grad and w.ds_status == ZeroParamStatus.NOT_AVAILABLE and w.numel() == 0

h = hidden.clone().requires_grad_()
logps, ent = engine(h)
assert w.numel() == 0  # partitioned again after the forward
g = torch.linspace(-1.0, 1.0, t.numel())
engine.backward((logps * g).sum() + ent.sum())

# the unsharded head: the same loss, its weight gradient in float64
w64 = weight.double().requires_grad_()
from fastrl.reference import naive_linear_logprobs
lp64, ent64 = naive_linear_logprobs(hidden.double(), w64, t, temperature=0.8, return_entropy=True)
((lp64 * g.double()).sum() + ent64.sum()).backward()
tol = dict(rtol=1e-5, atol=1e-5)
torch.testing.assert_close(logps, lp64.float().detach(), **tol)
full = safe_get_full_grad(w)  # both ranks ran the same batch: their mean is it
assert full is not None and full.shape == (37, 12)
torch.testing.assert_close(full, w64.grad.float(), **tol)
assert full.abs().sum() > 0
print("ZERO3_TRAINABLE_OK", dist.get_rank(), flush=True)
"""
    + EXIT
)


@pytest.mark.slow
def test_a_trainable_zero3_head_through_patch_trl_gets_the_unsharded_gradient(tmp_path):
    """Two processes, a trainable ZeRO-3 lm_head under a DeepSpeed engine (TRL full
    fine-tuning with DeepSpeed): patch_trl's head, called inside the model's forward under
    TRL's gather, gives the weight the unsharded head's gradient (float64 oracle), reduced
    by DeepSpeed into its partitions."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (an optional extra)")
    out = run_ranks(ZERO3_TRAINABLE_SCRIPT, tmp_path)
    assert out.count("ZERO3_TRAINABLE_OK") == 2, out[-2000:]


# ---------------------------------------------------------------- refusals


def _trainer(fsdp_version=None, use_vllm=False):
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    return SimpleNamespace(
        is_fsdp_enabled=plugin is not None,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        args=SimpleNamespace(use_vllm=use_vllm),
    )


def test_what_stays_refused(monkeypatch):
    from transformers.integrations import deepspeed

    refuse_sharded_parameters(_trainer())
    refuse_sharded_parameters(_trainer(fsdp_version=2))
    refuse_sharded_parameters(_trainer(use_vllm=True))  # DDP with vLLM
    with pytest.raises(ValueError, match=r"FSDP2 only .* fsdp_config=\{'version': 2\}"):
        refuse_sharded_parameters(_trainer(fsdp_version=1))
    with pytest.raises(ValueError, match="use_vllm=True does not support sharded .*FSDP2"):
        refuse_sharded_parameters(_trainer(fsdp_version=2, use_vllm=True))
    monkeypatch.setattr(deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    refuse_sharded_parameters(_trainer())
    with pytest.raises(ValueError, match="sharded parameters .DeepSpeed ZeRO-3.: .* use_vllm"):
        refuse_sharded_parameters(_trainer(use_vllm=True))


# ---------------------------------------------------------------- trainers under FSDP2

# the same global batch on one process (batch 2b) and on two (b each)
BATCH = {1: 8, 2: 4}
FSDP2 = dict(fsdp=True, fsdp_config={"version": 2})
# every parameter partitioned, the tiny ones too; the rest from the TrainingArguments
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    **dict.fromkeys(
        ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
         "gradient_clipping"),
        "auto",
    ),
}  # fmt: skip
ENGINES = {"fsdp2": dict(use_cpu=True, **FSDP2), "zero3": dict(deepspeed=ZERO3)}


def _common(out, world, engine=None):
    extra = dict(ddp_backend="gloo", **ENGINES[engine]) if world == 2 else dict(use_cpu=True)
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH[world],
        max_steps=2,
        optim="sgd",
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        activation_checkpointing=False,
        seed=0,
        **extra,
    )


def _first_token_reward(prompts, completions, completion_ids, **kwargs):
    return [float(ids[0] % 5) for ids in completion_ids]


def grpo_trainer(out, world, engine=None):
    """GRPO with a reference (beta), old log-probs (num_iterations=2) and greedy
    generation, the first completion token rewritten per group member so the group's
    completions (and rewards) differ the same way on any number of processes."""
    from fastrl.demo.task import arithmetic_dataset, build_tiny_model, build_tiny_tokenizer
    from fastrl.trainers import GRPOConfig, GRPOTrainer

    class Trainer(GRPOTrainer):
        def _sample(self, prompt_ids, prompt_mask):
            ids, logps = super()._sample(prompt_ids, prompt_mask)
            j = torch.arange(ids.shape[0], device=ids.device) % self.args.num_generations
            ids = ids.clone()
            ids[:, 0] = 4 + (7 * j + prompt_ids[:, -1]) % 90  # a character, never EOS
            return ids, logps

    tok = build_tiny_tokenizer()
    args = GRPOConfig(
        **_common(out, world, engine),
        num_generations=4,
        num_iterations=2,
        max_completion_length=5,
        learning_rate=2.0,
        beta=0.04,
        generation_kwargs={"do_sample": False},
    )
    return Trainer(
        build_tiny_model(tok, "test"),
        _first_token_reward,
        args=args,
        train_dataset=arithmetic_dataset(16, 0),
        processing_class=tok,
    )


def dpo_trainer(out, world, engine=None):
    from fastrl.demo.task import build_tiny_model, build_tiny_tokenizer, preference_pairs
    from fastrl.trainers import DPOConfig, DPOTrainer

    tok = build_tiny_tokenizer()
    # the defaults' activation checkpointing, and a checkpoint at the end
    common = dict(_common(out, world, engine), activation_checkpointing=True)
    common.update(save_strategy="steps", save_steps=2)
    args = DPOConfig(
        **common,
        learning_rate=0.5,
        beta=0.5,
        train_sampling_strategy="sequential",
    )
    return DPOTrainer(
        build_tiny_model(tok, "test"),
        args,
        train_dataset=preference_pairs(32, 0),
        processing_class=tok,
    )


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter's full value (a collective for an FSDP2 or ZeRO-3 shard)."""
    if hasattr(p, "full_tensor"):
        return p.full_tensor()
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.data.clone()
    return p


def lora_weights(model) -> dict[str, torch.Tensor]:
    """The LoRA weights, whole (every process must call it under sharding)."""
    return {n: _whole(p).detach().clone() for n, p in model.named_parameters() if "lora_" in n}


SHARDED_SCRIPT = """
from fastrl.integrations import is_sharded, lm_head
from tests.trainers.test_sharded import {factory}, lora_weights
trainer = {factory}({out!r}, world=2, engine={engine!r})
assert trainer.is_fsdp_enabled if {engine!r} == "fsdp2" else trainer.is_deepspeed_enabled
trainer.train()
assert trainer.state.global_step == 2
model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
if {engine!r} == "fsdp2":
    from torch.distributed.fsdp import FSDPModule
    assert isinstance(trainer.model_wrapped, FSDPModule)
else:
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    assert lm_head(model).weight.numel() == 0  # partitioned
# between steps the engine keeps shards only: the lm_head and the LoRA weights
assert is_sharded(lm_head(model).weight)
assert any(is_sharded(p) for n, p in model.named_parameters() if "lora_" in n)
weights = lora_weights(model)
if dist.get_rank() == 0:
    torch.save(weights, {path!r})
print("TRAINED", dist.get_rank(), flush=True)
"""


def _assert_sharded_run_matches_one_process(factory, tmp_path, engine="fsdp2"):
    path = tmp_path / "sharded_weights.pt"
    shim = FSDP_ON_CPU if engine == "fsdp2" else DEEPSPEED_ON_CPU
    script = shim + SHARDED_SCRIPT.format(
        factory=factory.__name__, out=str(tmp_path / engine), path=str(path), engine=engine
    )
    out = run_ranks(script + EXIT, tmp_path)
    assert out.count("TRAINED") == 2, out[-2000:]
    sharded = torch.load(path, weights_only=True)

    single = factory(tmp_path / "single", world=1)
    before = lora_weights(single.model)
    single.train()
    want = lora_weights(single.model)
    assert set(sharded) == set(want)
    saved = tmp_path / engine / "checkpoint-2" / "adapter_model.safetensors"
    if factory is dpo_trainer:  # the checkpoint holds the trained adapter
        from safetensors.torch import load_file

        adapter = load_file(saved)
        assert len(adapter) == len(sharded)
        for name, value in sharded.items():
            torch.testing.assert_close(adapter[name.replace(".default", "")], value, msg=name)
    moved = max(float((want[k] - before[k]).abs().max()) for k in want)
    assert moved > 1e-2, moved  # the steps did train
    for name in want:
        # summation order differs (two half-batch gradients averaged vs one batch)
        torch.testing.assert_close(sharded[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp2_grpo_matches_one_process(tmp_path):
    _assert_sharded_run_matches_one_process(grpo_trainer, tmp_path)


@pytest.mark.slow
def test_fsdp2_dpo_matches_one_process(tmp_path):
    _assert_sharded_run_matches_one_process(dpo_trainer, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("factory", [grpo_trainer, dpo_trainer], ids=["grpo", "dpo"])
def test_zero3_matches_one_process(factory, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (an optional extra)")
    _assert_sharded_run_matches_one_process(factory, tmp_path, engine="zero3")


# ---------------------------------------------------------------- patch_trl under FSDP2

TRL_SCRIPT = """
import datasets, trl
from transformers import set_seed
from fastrl.integrations import is_sharded, patch_trl
from tests.support.models import tiny_model, tiny_tokenizer
from tests.trainers.test_sharded import _whole

def reward(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def train(out):
    args = trl.GRPOConfig(out, per_device_train_batch_size=4, num_generations=4, max_steps=2,
                          max_completion_length=6, learning_rate=0.1, optim="sgd", use_cpu=True,
                          save_strategy="no", report_to="none", gradient_checkpointing=False,
                          bf16=False, seed=0, ddp_backend="gloo", fsdp=True,
                          fsdp_config={{"version": 2}})
    ds = datasets.Dataset.from_dict({{"prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8"] * 4}})
    set_seed(0)
    trainer = trl.GRPOTrainer(model=tiny_model(), reward_funcs=reward, args=args,
                              train_dataset=ds, processing_class=tiny_tokenizer())
    trainer.train()
    head = trainer.model.get_output_embeddings().weight
    assert trainer.is_fsdp_enabled and is_sharded(head) and head.requires_grad
    return {{n: _whole(p).detach().clone() for n, p in trainer.model.named_parameters()}}

theirs = train({out!r} + "/trl")
with patch_trl(impl="torch") as patch:
    ours = train({out!r} + "/patched")
assert patch.calls > 0 and patch.fallback_calls == 0, (patch.calls, patch.fallback_calls)
moved = 0.0
fresh = dict(tiny_model().named_parameters())
for name, want in theirs.items():
    # the fully fine-tuned lm_head too: its gradient came through the patch, full_tensor's
    # backward reduce-scattered it
    torch.testing.assert_close(ours[name], want, rtol=1e-5, atol=1e-6, msg=name)
    moved = max(moved, float((want - fresh[name]).abs().max()))
assert moved > 1e-3, moved
print("PATCH_OK", dist.get_rank(), flush=True)
"""


@pytest.mark.slow
def test_patch_trl_under_fsdp2_matches_trl(tmp_path):
    """TRL's GRPOTrainer (full fine-tuning, trainable lm_head) under FSDP2 on two
    processes ends with the same weights with and without the patch."""
    script = FSDP_ON_CPU + TRL_SCRIPT.format(out=str(tmp_path))
    out = run_ranks(script + EXIT, tmp_path)
    assert out.count("PATCH_OK") == 2, out[-2000:]
