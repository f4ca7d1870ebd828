"""fastrl's and TRL 1.16's KTOTrainer around the same tiny Llama and LoRA adapter (the
KTO trainer and parity tests)."""

import copy

import pytest

datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

from fastrl.trainers.kto_config import KTOConfig  # noqa: E402
from fastrl.trainers.kto_trainer import KTOTrainer  # noqa: E402
from tests.support.args import cpu_args  # noqa: E402
from tests.support.lora import LORA, lora_model, share_adapter  # noqa: E402
from tests.support.models import tiny_model, tiny_tokenizer  # noqa: E402

# six unpaired completions, both labels, unequal prompt and completion lengths
UNPAIRED_DS = dict(
    prompt=["w1 w2", "w3", "w4 w5 w6", "w7", "w8 w9", "w10"],
    completion=[" w8 w9", " w10 w11 w12", " w13", " w14 w15 w16 w17", " w18", " w19 w20"],
    label=[True, False, True, True, False, False],
)
B = len(UNPAIRED_DS["prompt"])


def common_args(tmp, **kw) -> dict:
    """The TrainingArguments both trainers take here: CPU, float32, no saving."""
    base = dict(per_device_train_batch_size=B, activation_checkpointing=False, bf16=False)
    return cpu_args(tmp, **{**base, **kw})


def kto_pair(tmp, data=None, **config):
    """Ours and TRL's around the same weights: TRL builds its LoRA from a peft_config on
    the base model (so its reference is the base with adapters off, as ours), then gets
    our adapter. `config`: options both configs take at construction."""
    ds = datasets.Dataset.from_dict(UNPAIRED_DS if data is None else data)
    lora = lora_model()
    ours = KTOTrainer(
        copy.deepcopy(lora),
        KTOConfig(**common_args(tmp / "ours", disable_tqdm=True, **config)),
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
    )
    theirs = trl.KTOTrainer(
        tiny_model(),
        args=trl.KTOConfig(**common_args(tmp / "trl", **config)),
        train_dataset=ds,
        processing_class=tiny_tokenizer(),
        peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    share_adapter(lora, ours, theirs)
    return ours, theirs


def first_batch(trainer, n=B):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
