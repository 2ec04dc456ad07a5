"""Gathers a chunk's FSDP2 dim-0 shards with one collective per process group, in the background.

FSDP2 shards a parameter on dim 0 the way `torch.chunk` splits it: with n rows over N ranks and
c = ceil(n / N), rank r holds rows [r*c, min((r+1)*c, n)), possibly none. `ShardGather` packs every
piece added for one process group into one byte buffer, each piece in a slot of c rows at the same
offset on every rank, runs one `all_gather_into_tensor` on it, and cuts each full tensor out of the
result (rank r's slot holds rows r*c.., so the slots laid end to end, cut at n rows, are the tensor).
That is one collective and two copies per chunk and group, instead of one collective and its Python
per parameter. Pieces may be of any dtype; they travel as bytes (FP8/FP4 codes included).

`start()` launches the collectives with `async_op=True`, so a chunk's gather runs while the previous
chunk is quantized and sent; `wait()` returns the full tensors. Invariant: every rank of a group adds
pieces of the same shapes, dtypes and order, and starts its gathers in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

Shape = tuple[int, ...]


@dataclass
class _Group:
    """The pieces of one process group, packed at `offsets` into slots of their per-rank row count."""

    pg: dist.ProcessGroup
    size: int
    rank: int
    pieces: list[tuple[int, Tensor, Shape, int]] = field(default_factory=list)  # (key, local, full, offset)
    total: int = 0
    out: Tensor | None = None
    packed: Tensor | None = None  # held until the gather is waited for: the collective reads it
    work: dist.Work | None = None


def _slot(full_shape: Shape, itemsize: int, size: int) -> tuple[int, int]:
    """(rows per rank c, bytes per row) of a tensor of `full_shape` split on dim 0 over `size` ranks."""
    row_bytes = math.prod(full_shape[1:]) * itemsize
    return math.ceil(full_shape[0] / size), row_bytes


def local_rows(n: int, size: int, rank: int) -> int:
    """How many of `n` dim-0 rows rank `rank` of `size` holds (FSDP2's / `torch.chunk`'s split)."""
    c = math.ceil(n / size)
    return max(0, min(n, (rank + 1) * c) - rank * c)


class ShardGather:
    """Collects dim-0 shards (`add`), gathers them per group in one collective (`start`), then gives the
    full tensors by key (`wait`). One instance per chunk; not reusable."""

    def __init__(self) -> None:
        self._groups: dict[int, _Group] = {}
        self._keys = 0
        self.bytes_received = 0

    def add(self, local: Tensor, full_shape: Shape, pg: dist.ProcessGroup, size: int, rank: int) -> int:
        """Queue `local` (this rank's rows of a tensor of `full_shape` split over `size` ranks of `pg`);
        returns the key `wait()` gives the full tensor under."""
        expected = local_rows(full_shape[0], size, rank)
        if tuple(local.shape) != (expected, *full_shape[1:]):
            raise ValueError(
                f"shard of shape {list(local.shape)} on rank {rank} of {size}: a dim-0 split of "
                f"{list(full_shape)} holds {expected} rows there"
            )
        g = self._groups.setdefault(id(pg), _Group(pg, size, rank))
        rows, row_bytes = _slot(full_shape, local.element_size(), size)
        key = self._keys
        self._keys += 1
        g.pieces.append((key, local, full_shape, g.total))
        g.total += rows * row_bytes
        return key

    def start(self) -> None:
        """Pack each group's pieces and launch its all-gather (asynchronous)."""
        for g in self._groups.values():
            if not g.pieces or g.size == 1:
                continue  # a group of one: each piece is already the full tensor
            device = g.pieces[0][1].device
            packed = torch.empty(g.total, dtype=torch.uint8, device=device)
            for _, local, _, offset in g.pieces:
                if local.numel():
                    data = local.contiguous().reshape(-1).view(torch.uint8)
                    packed[offset : offset + data.numel()].copy_(data)
            g.out, g.packed = torch.empty(g.size * g.total, dtype=torch.uint8, device=device), packed
            g.work = dist.all_gather_into_tensor(g.out, packed, group=g.pg, async_op=True)

    def wait(self) -> dict[int, Tensor]:
        """The full tensors by key, once every group's gather is done (fresh tensors; in a group of one
        the pieces themselves)."""
        full: dict[int, Tensor] = {}
        for g in self._groups.values():
            if g.size == 1:
                full.update((key, local) for key, local, _, _ in g.pieces)
                continue
            if g.work is not None:
                g.work.wait()
            if g.out is None:
                continue
            table = g.out.view(g.size, g.total)
            for key, local, shape, offset in g.pieces:
                rows, row_bytes = _slot(shape, local.element_size(), g.size)
                # a strided slice, so reshape copies it (unless one piece fills the table: then a view)
                flat = table[:, offset : offset + rows * row_bytes].reshape(-1)[: shape[0] * row_bytes]
                full[key] = flat.view(local.dtype).view(shape)
                self.bytes_received += shape[0] * row_bytes
            g.out = g.packed = g.work = None
        return full
