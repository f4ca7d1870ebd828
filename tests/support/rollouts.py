"""What the generating trainers' tests (GRPO, PPO) share: prompts and a reward."""

PROMPTS = ["12+7=", "30-4=", "5+5=", "81-9="]


def letter_share(prompts, completions, **kwargs):
    """Varies across random completions, so that groups have non-zero advantages."""
    return [sum(ch.isalpha() for ch in c) / (1 + len(c)) for c in completions]
