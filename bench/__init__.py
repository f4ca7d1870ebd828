"""fastrl benchmarks (run as scripts: `python bench/bench_logprobs.py`)."""
