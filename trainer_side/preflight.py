"""Before a sync: how big the walk's chunks are, and whether a memory budget can hold one of them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from configs.quant import QuantScheme
from trainer_side.layers import output_specs, plan_chunks
from trainer_side.names import NameMap

_WORKSPACE_FP32_COPIES = 3


class MemoryBudgetError(ValueError):
    """The memory budget cannot hold the largest chunk of the walk plus the send buckets."""


@dataclass(frozen=True)
class Preflight:
    """Sizes of a walk. "Source" bytes are the tensors unquantized (e.g. BF16), "sent" bytes as yielded.

    `walk_peak_bytes` bounds what the walk holds at once: the largest chunk as sent, plus one full
    parameter in the trainer's storage dtype (what a gather or a cast materialises while converting),
    plus the quantizer's workspace for the largest quantized matrix (its eager temporaries stay under
    three FP32 copies of the matrix).
    """

    num_chunks: int
    num_tensors: int
    largest_chunk: str
    largest_chunk_bytes: int
    largest_chunk_source_bytes: int
    largest_param_bytes: int
    quantize_workspace_bytes: int
    total_bytes: int
    total_source_bytes: int

    @property
    def walk_peak_bytes(self) -> int:
        return self.largest_chunk_bytes + self.largest_param_bytes + self.quantize_workspace_bytes


def preflight(
    model: nn.Module,
    scheme: QuantScheme,
    name_map: NameMap | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Preflight:
    """Sizes of the walk `iter_layer_chunks(model, scheme, name_map, dtype=dtype)` would make."""
    unquantized = QuantScheme()
    sent: dict[str, int] = {}
    source: dict[str, int] = {}
    num_tensors = 0
    largest_param = 0
    largest_quantized = 0
    for chunk in plan_chunks(model, scheme, name_map):
        specs = [s for src in chunk.sources for s in output_specs(src, scheme, dtype)]
        plain = [s for src in chunk.sources for s in output_specs(src, unquantized, dtype)]
        num_tensors += len(specs)
        sent[chunk.label] = sum(_nbytes(dt, shape) for _, dt, shape in specs)
        source[chunk.label] = sum(_nbytes(dt, shape) for _, dt, shape in plain)
        largest_param = max([largest_param, *(src.source_bytes for src in chunk.sources)])
        quantized = [math.prod(o.shape) for src in chunk.sources for o in src.outputs if o.quantize]
        largest_quantized = max([largest_quantized, *quantized])
    if not sent:
        raise ValueError(f"{type(model).__name__} yields no tensors")
    largest = max(sent, key=lambda label: sent[label])
    return Preflight(
        num_chunks=len(sent),
        num_tensors=num_tensors,
        largest_chunk=largest,
        largest_chunk_bytes=sent[largest],
        largest_chunk_source_bytes=max(source.values()),
        largest_param_bytes=largest_param,
        quantize_workspace_bytes=_WORKSPACE_FP32_COPIES * 4 * largest_quantized,
        total_bytes=sum(sent.values()),
        total_source_bytes=sum(source.values()),
    )


def require_memory_budget(pre: Preflight, budget_bytes: int, bucket_bytes: int = 0) -> None:
    """Raise `MemoryBudgetError`, naming the numbers, when `budget_bytes` cannot hold one chunk + buckets.

    `bucket_bytes` is the total of the send buckets alive at once (e.g. 2 x bucket size when double
    buffering).
    """
    need = pre.walk_peak_bytes + bucket_bytes
    if need > budget_bytes:
        raise MemoryBudgetError(
            f"memory budget {_mib(budget_bytes)} is too small for the walk: largest chunk "
            f"{pre.largest_chunk!r} is {_mib(pre.largest_chunk_bytes)} as sent, "
            f"+ {_mib(pre.largest_param_bytes)} for the largest parameter while it is converted, "
            f"+ {_mib(pre.quantize_workspace_bytes)} of quantizer workspace, "
            f"+ {_mib(bucket_bytes)} of send buckets "
            f"= {_mib(need)} needed"
        )


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n} bytes)"
