"""Framing: where each tensor's bytes travel in the stream of fixed-capacity byte buckets.

Invariants `plan_buckets` guarantees (and `check_layout` verifies on a received header):
- tensors keep manifest order; every offset in a bucket is a multiple of `ALIGN` (so any dtype can be
  re-viewed in place) and every bucket size is a positive multiple of `ALIGN`, at most `bucket_size`;
- a tensor that fits in a bucket is never split (it starts a new bucket instead), so only tensors larger
  than a whole bucket need staging on arrival; those are cut into pieces filling consecutive buckets;
- every tensor has at least one piece (a zero-byte one for empty tensors), so it has a place in order.
Dtypes travel by name (`configs.wire.WIRE_DTYPES`); FP8 / e8m0 / packed FP4 are just bytes on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from configs.quant import QuantScheme
from configs.wire import WIRE_DTYPES, ManifestEntry, SyncHeader, TensorPiece

ALIGN = 16
DEFAULT_BUCKET_SIZE = 256 << 20

WireSpec = tuple[str, "torch.dtype | str", Sequence[int]]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float8_e4m3fn` -> `"float8_e4m3fn"`; raises for dtypes the wire does not carry."""
    name = str(dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} is not carried on the wire (supported: {', '.join(WIRE_DTYPES)})")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """`"bfloat16"` -> `torch.bfloat16`; raises for names the wire does not carry."""
    dtype = getattr(torch, name, None) if name in WIRE_DTYPES else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not carried on the wire (supported: {', '.join(WIRE_DTYPES)})")
    return dtype


def entry_nbytes(dtype: torch.dtype | str, shape: Sequence[int]) -> int:
    dt = dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    return math.prod(shape) * dt.itemsize


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(
    specs: Sequence[WireSpec], bucket_size: int = DEFAULT_BUCKET_SIZE
) -> tuple[tuple[int, ...], tuple[ManifestEntry, ...]]:
    """Pack `(name, dtype, shape)` specs, in order, into buckets; returns (bucket_sizes, entries)."""
    if bucket_size <= 0 or bucket_size % ALIGN:
        raise ValueError(f"bucket_size must be a positive multiple of {ALIGN}, got {bucket_size}")
    entries: list[ManifestEntry] = []
    ends: list[int] = [0]
    bucket, offset = 0, 0
    seen: set[str] = set()
    for name, dtype, shape in specs:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice in the manifest")
        seen.add(name)
        dt_name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        shape_t = tuple(int(s) for s in shape)
        nbytes = entry_nbytes(dt_name, shape_t)
        offset = _align(offset)
        pieces: list[TensorPiece] = []
        if nbytes <= bucket_size:
            if offset + nbytes > bucket_size:
                bucket, offset = bucket + 1, 0
                ends.append(0)
            pieces.append(TensorPiece(bucket=bucket, bucket_offset=offset, tensor_offset=0, nbytes=nbytes))
            offset += nbytes
            ends[bucket] = offset
        else:
            done = 0
            while done < nbytes:
                if offset >= bucket_size:
                    bucket, offset = bucket + 1, 0
                    ends.append(0)
                take = min(nbytes - done, bucket_size - offset)
                pieces.append(
                    TensorPiece(bucket=bucket, bucket_offset=offset, tensor_offset=done, nbytes=take)
                )
                done += take
                offset += take
                ends[bucket] = offset
        entries.append(ManifestEntry(name=name, dtype=dt_name, shape=shape_t, pieces=tuple(pieces)))
    if not entries:
        return (), ()
    return tuple(max(ALIGN, _align(end)) for end in ends), tuple(entries)


def make_header(
    specs: Sequence[WireSpec],
    *,
    sync_id: str,
    weights_version: int,
    scheme: QuantScheme | None = None,
    layout: str = "checkpoint",
    bucket_size: int = DEFAULT_BUCKET_SIZE,
    checksum: bool = False,
) -> SyncHeader:
    """Plan the buckets for `specs` and wrap them in the header the sender broadcasts."""
    sizes, entries = plan_buckets(specs, bucket_size)
    return SyncHeader(
        sync_id=sync_id,
        weights_version=weights_version,
        scheme=scheme or QuantScheme(),
        layout=layout,
        bucket_sizes=sizes,
        entries=entries,
        checksum=checksum,
    )


def check_layout(header: SyncHeader, max_bucket_size: int | None = None) -> str | None:
    """Why a received header's framing is unusable (a reason to refuse), or None if it is sound."""
    sizes = header.bucket_sizes
    if max_bucket_size is not None and header.max_bucket_size > max_bucket_size:
        return f"bucket of {header.max_bucket_size} bytes exceeds this receiver's limit of {max_bucket_size}"
    if any(s <= 0 or s % ALIGN for s in sizes):
        return f"bucket sizes must be positive multiples of {ALIGN}"
    last = (0, 0)
    for e in header.entries:
        try:
            nbytes = entry_nbytes(e.dtype, e.shape)
        except ValueError as err:
            return f"{e.name}: {err}"
        if not e.pieces or e.nbytes != nbytes:
            return f"{e.name}: pieces carry {e.nbytes} bytes, dtype and shape need {nbytes}"
        covered = 0
        for p in e.pieces:
            if p.bucket >= len(sizes) or p.bucket_offset + p.nbytes > sizes[p.bucket]:
                return f"{e.name}: piece out of bucket bounds"
            if p.bucket_offset % ALIGN or p.tensor_offset != covered or (p.bucket, p.bucket_offset) < last:
                return f"{e.name}: pieces out of order or misaligned"
            covered += p.nbytes
            last = (p.bucket, p.bucket_offset + p.nbytes)
    return None


def pieces_by_bucket(header: SyncHeader) -> list[list[tuple[int, TensorPiece]]]:
    """For each bucket, its (entry index, piece) pairs in stream order."""
    out: list[list[tuple[int, TensorPiece]]] = [[] for _ in header.bucket_sizes]
    for i, e in enumerate(header.entries):
        for p in e.pieces:
            out[p.bucket].append((i, p))
    return out


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (copies only if `t` is not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)
