"""Walk a trainer model one decoder layer at a time as HF-checkpoint-named, quantized tensors.

`plan_stream` lists every tensor of the walk from metadata alone (for the manifest); `iter_layer_chunks`
yields the same tensors, in the same order, one chunk at a time: the parameters before the decoder
layers (embeddings), each decoder layer, then the parameters after them (final norm, lm_head).

FSDP2 models: each chunk's shards are gathered by one collective per process group
(`shard_gather.ShardGather`), started while the previous chunk is handed out, so the walk holds about
two chunks. The gathers are collectives, so every rank of the FSDP mesh must run `iter_layer_chunks`
with the same arguments and exhaust it in lockstep; every rank gets the same chunks, and ranks that do
not send just drop them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from configs.quant import QuantScheme
from trainer_side.layers import (
    POST_LAYERS,
    PRE_LAYERS,
    ChunkGathers,
    ChunkPlan,
    TensorSpec,
    output_specs,
    plan_chunks,
)
from trainer_side.names import NameMap

_LOG = logging.getLogger("layercast.trainer")

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

    `bytes_gathered` is what this rank received through FSDP gathers for the chunk (0 unsharded);
    `gathered_before_quantizing` names each sharded parameter that was gathered, then quantized (or
    gathered alone), with the reason; the others were quantized shard by shard, or needed no quantizing.
    """

    label: str
    tensors: list[tuple[str, Tensor]]
    bytes_gathered: int = 0
    gathered_before_quantizing: dict[str, str] = field(default_factory=dict)

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


def iter_layer_chunks(
    model: nn.Module,
    scheme: QuantScheme,
    name_map: NameMap | None = None,
    *,
    dtype: torch.dtype | None = None,
    gathers: ChunkGathers | None = None,
) -> Iterator[LayerChunk]:
    """Yield the model chunk by chunk, tensors named and ordered exactly as `plan_stream` lists them.
    `gathers`: the chunks' gathers, when the caller made them (for the same model, scheme, names, dtype).

    The generator keeps nothing of a chunk once it is yielded: a chunk's memory goes when the consumer
    drops it (it holds the next chunk's gather meanwhile). Unquantized tensors of an unsharded model
    are detached views of the parameters (no copy).
    """
    gathers = gathers or ChunkGathers(plan_chunks(model, scheme, name_map), scheme, dtype)
    pending: _ScaleCheck | None = None
    try:
        while not gathers.done:
            current = gathers.advance()  # starts the next chunk's gather: it runs while this one is sent
            built = LayerChunk(current.label, current.tensors(), current.gather.bytes_received, current.notes)
            del current
            check = _ScaleCheck.of(built) if scheme.quantized else None
            if pending is not None:
                pending.raise_if_bad()  # the previous chunk's: long computed, so no stall
            pending = check
            yield built
            del built, check  # hold nothing of a yielded chunk but its (small) scales
        if pending is not None:
            pending.raise_if_bad()
    finally:
        # Stopped early (the consumer closed the walk, or a check raised): the other ranks of the mesh
        # walk on, so run the remaining gathers with them.
        if not gathers.done:
            try:
                gathers.drain()
            except Exception:
                _LOG.warning("draining the FSDP gathers after an early stop failed", exc_info=True)


@dataclass
class _ScaleCheck:
    """A chunk's quantization scales (small) and a device flag: does any hold inf/NaN? A non-finite
    weight makes its scale non-finite. The flag is computed without a host sync and read one chunk
    later, so the walk costs one cheap sync per chunk instead of one stall per tensor."""

    label: str
    scales: list[tuple[str, Tensor]]
    flag: Tensor

    @classmethod
    def of(cls, chunk: LayerChunk) -> _ScaleCheck | None:
        scales = [(n, t) for n, t in chunk.tensors if "scale" in n.rsplit(".", 1)[-1]
                  and t.is_floating_point() and t.dtype.itemsize >= 2]  # fmt: skip
        if not scales:
            return None
        # One flat copy of the (small) scales, then one reduction: a few kernel launches per chunk.
        flat = torch.cat([t.reshape(-1).float() for _, t in scales])
        return cls(chunk.label, scales, ~torch.isfinite(flat).all())

    def raise_if_bad(self) -> None:
        if bool(self.flag):
            bad = [n for n, t in self.scales if not bool(torch.isfinite(t).all())]
            raise ValueError(
                f"{self.label}: weights behind {', '.join(bad[:5])} hold inf or NaN; refusing to quantize "
                "them to FP8"
            )
