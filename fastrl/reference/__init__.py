"""Plain-PyTorch oracles (float64, materialised logits) that the kernels are tested against."""

from fastrl.reference.logprobs import naive_linear_logprobs

__all__ = ["naive_linear_logprobs"]
