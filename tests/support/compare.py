"""How the parity tests compare fastrl with TRL: tolerances and gradients."""

import torch

# float32 throughout. On the very log-prob tensors TRL computed fastrl runs the same float32
# ops as TRL up to summation order; its own log-probs are computed another way (full logits
# vs TRL's chunked head).
TOL_SAME_LOGPS = dict(rtol=1e-6, atol=1e-6)
TOL_OWN_LOGPS = dict(rtol=1e-5, atol=1e-5)


def _grads(loss, tensors):
    """d loss / d each of `tensors` (zeros where it does not depend on one); the graph is kept."""
    return torch.autograd.grad(loss, tensors, retain_graph=True, materialize_grads=True)


def _assert_grads_close(ours, theirs, tol):
    """Gradients agree to `tol` relative to each tensor's largest entry.

    A parameter's gradient sums contributions of every token, some of which cancel, so
    its small entries carry the rounding of the large ones: relative error per element
    is not meaningful, relative error against the tensor's scale is.
    """
    for a, b in zip(ours, theirs, strict=True):
        scale = b.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(a / scale, b / scale, **tol)
