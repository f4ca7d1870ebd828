"""The `TrainingArguments` options every CPU trainer test shares."""


def cpu_args(tmp, **kw) -> dict:
    """Options for a trainer test writing under ``tmp``: on the CPU, nothing saved or
    reported, seed 0; ``kw`` on top (and over them)."""
    base = dict(output_dir=str(tmp), report_to="none", use_cpu=True, save_strategy="no", seed=0)
    return {**base, **kw}
