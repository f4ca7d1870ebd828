"""What more than one test file uses, in one place (test files never import each other).

- this module: `HAS_CUDA` and `DEVICE`, the device the tests put their tensors on, and
  `to_device`;
- `models`: the tiny random Llama and its in-code word-level tokenizer;
- `compare`: the parity tolerances and the gradient comparison;
- `trl_grpo`, `trl_dpo`: TRL trainers around the tiny model, configured per case, and
  the inputs and fastrl options that match them;
- `logprobs`: the log-prob tests' inputs (a linear head's hidden states, weight,
  targets and bias);
- `memory`: a recorder of the tensors aten allocates;
- `bench`: the checks the smoke tests of bench/ share;
- `ranks`: a training script run on two CPU processes;
- `compile_for_gpu.py`: a script (run by path) that compiles every kernel for a GPU.

tests/conftest.py registers this package for pytest's assertion rewriting, so a failing
check in a helper reports its values as one in a test file does.
"""

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def to_device(x):
    """`x` on `DEVICE` if it is a tensor, else `x` as it is (None, a number)."""
    return x.to(DEVICE) if isinstance(x, torch.Tensor) else x
