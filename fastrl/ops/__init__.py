"""The ops: each folder holds one op's public function and autograd glue, its PyTorch
path and its float64 `naive` oracle; the Triton kernels live in `fastrl.kernels`
(the repository's top-level `kernels/`)."""
