"""Walk a trainer model one decoder layer at a time as HF-checkpoint-named, quantized tensors.

`plan_stream` lists every tensor of the walk from metadata alone (for the manifest); `iter_layer_chunks`
yields the same tensors, in the same order, one chunk at a time: the parameters before the decoder
layers (embeddings), each decoder layer, then the parameters after them (final norm, lm_head).

FSDP2 models: the walk gathers one parameter at a time, so it holds about one chunk. The gathers are
collectives, so every rank of the FSDP mesh must run `iter_layer_chunks` with the same arguments and
exhaust it in lockstep; every rank gets the same chunks, and ranks that do not send just drop them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from configs.quant import QuantScheme
from trainer_side.layers import (
    POST_LAYERS,
    PRE_LAYERS,
    ChunkPlan,
    TensorSpec,
    chunk_global_amaxes,
    materialize,
    output_specs,
    plan_chunks,
)
from trainer_side.names import NameMap

__all__ = [
    "POST_LAYERS",
    "PRE_LAYERS",
    "LayerChunk",
    "NameMap",
    "TensorSpec",
    "iter_layer_chunks",
    "plan_stream",
]


@dataclass(frozen=True)
class LayerChunk:
    """One step of the walk: a decoder layer (`model.layers.3`) or `non_layer.pre` / `non_layer.post`.

    `bytes_gathered` is what this rank received through FSDP gathers for the chunk (0 unsharded).
    """

    label: str
    tensors: list[tuple[str, Tensor]]
    bytes_gathered: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors)


def _chunk_specs(chunk: ChunkPlan, scheme: QuantScheme, dtype: torch.dtype | None) -> list[TensorSpec]:
    return [
        TensorSpec(name, dt, shape, chunk.label)
        for src in chunk.sources
        for name, dt, shape in output_specs(src, scheme, dtype)
    ]


def plan_stream(
    model: nn.Module,
    scheme: QuantScheme,
    name_map: NameMap | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> list[TensorSpec]:
    """Every tensor `iter_layer_chunks` will yield, in order, from metadata only (no gather, no quantization).

    `name_map` turns trainer parameter names (wrapper parts such as `_orig_mod` already stripped) into
    HF transformers names, or None to drop one. `dtype` casts every yielded floating tensor (and the
    quantizer's input) first, e.g. torch.bfloat16 for a trainer holding FP32 master weights; None keeps
    each parameter's own dtype.
    """
    specs = [s for chunk in plan_chunks(model, scheme, name_map) for s in _chunk_specs(chunk, scheme, dtype)]
    dupes = sorted(name for name, n in Counter(s.name for s in specs).items() if n > 1)
    if dupes:
        raise ValueError(f"several trainer parameters map to the same checkpoint name: {dupes[:5]}")
    return specs


@torch.no_grad()
def _build(chunk: ChunkPlan, scheme: QuantScheme, dtype: torch.dtype | None) -> LayerChunk:
    tensors: list[tuple[str, Tensor]] = []
    gathered = 0
    amax_of = chunk_global_amaxes(chunk.sources, scheme, dtype)  # NVFP4 global scales; {} otherwise
    for src in chunk.sources:
        named, nbytes = materialize(src, scheme, dtype, amax_of)
        tensors += named
        gathered += nbytes
    return LayerChunk(chunk.label, tensors, gathered)


def iter_layer_chunks(
    model: nn.Module,
    scheme: QuantScheme,
    name_map: NameMap | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Iterator[LayerChunk]:
    """Yield the model chunk by chunk, tensors named and ordered exactly as `plan_stream` lists them.

    The generator keeps nothing of a chunk once it is yielded: a chunk's memory goes when the consumer
    drops it. Unquantized tensors of an unsharded model are detached views of the parameters (no copy).
    """
    for chunk in plan_chunks(model, scheme, name_map):
        yield _build(chunk, scheme, dtype)
