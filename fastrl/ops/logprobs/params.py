"""The non-tensor arguments of one `linear_logprobs` call, as one frozen object.

A `torch.library` op takes plain values, so the ops of custom_ops.py take these as
keyword-only arguments: `op_kwargs()` turns the object into them, `LogprobsParams(**kw)`
turns them back, and `SCHEMA` is their part of the ops' schemas. Autograd gives
keyword-only arguments no gradient, so no backward counts their positions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LogprobsParams:
    temperature: float  # logits are divided by it, after the softcap
    softcap: float | None  # c * tanh(x / c), or None
    ignore_index: int  # the target id of positions that are not scored
    return_entropy: bool
    return_is_top1: bool
    return_log_sum_sq: bool
    backend: str  # "torch" or a Triton design: "tiles", "cublas", "frozen"

    def op_kwargs(self) -> dict[str, float | int | bool | str | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# the torch.library schema type of each annotation above
_SCHEMA_TYPES = {"float": "float", "float | None": "float?", "int": "int", "bool": "bool",
                 "str": "str"}  # fmt: skip
#: "float temperature, float? softcap, ...": the keyword-only part of the ops' schemas
SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in fields(LogprobsParams))
