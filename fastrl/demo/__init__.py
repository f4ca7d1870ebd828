"""The demo (`fastrl demo`, the README's main job): a tiny arithmetic task, an SFT
warm-up, GRPO and DPO with LoRA and a LoRA reward model on a model built in code.

- `task.py`: the task's data, tokenizer, model and SFT loop;
- `run.py`: `run_demo`, the four stages (the reward model: `train_reward_model`), the plot
  and the saved models.
"""
