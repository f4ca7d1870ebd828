"""Per-token log-probs and entropies from hidden states and an lm_head weight.

- `linear.py`: `linear_logprobs`, `sequence_logprobs` (the public functions, padding
  compaction, the choice of backend);
- `custom_ops.py`: the `torch.library` ops over the designs (`tiles`, `cublas`, `frozen`)
  and the PyTorch path, what `torch.compile` sees;
- `params.py`: `LogprobsParams`, the non-tensor arguments those ops take;
- `chunked.py`: the PyTorch path (vocabulary chunks, no `[N, V]` buffer);
- `vocab_parallel.py`: the lm_head split by vocabulary over a tensor-parallel group
  (`process_group=`): each shard's statistics merged by one all-gather, a local backward;
- `naive.py`: the float64 oracle `naive_linear_logprobs`;
- kernels: `fastrl.kernels.linear_logprobs` (tiles), `.cublas_logprobs`, `.frozen_logprobs`.
"""

from fastrl.ops.logprobs.linear import linear_logprobs, sequence_logprobs

__all__ = ["linear_logprobs", "sequence_logprobs"]
