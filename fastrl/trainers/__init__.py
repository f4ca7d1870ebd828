"""LoRA-first GRPO and DPO trainers built on transformers.Trainer and peft."""
