"""Typed messages that cross the wire between the trainer's sender and the inference receivers.

A sync is: one `SyncHeader` (broadcast as JSON bytes), an accept/refuse vote of every rank, then the
buckets the header's manifest describes, then a commit vote. These models are the single definition of
that protocol; `broadcaster` enforces it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from configs.quant import QuantScheme

PROTOCOL_VERSION = 2

# Dtypes the wire carries, by name. FP8/FP4 travel as raw bytes and are re-viewed on arrival.
WIRE_DTYPES: tuple[str, ...] = (
    "float32",
    "bfloat16",
    "float16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "uint8",
    "int8",
    "int32",
    "int64",
)


class TensorPiece(BaseModel):
    """A byte range of one tensor that lives in one bucket."""

    model_config = ConfigDict(frozen=True)

    bucket: int = Field(ge=0)
    bucket_offset: int = Field(ge=0)
    tensor_offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class ManifestEntry(BaseModel):
    """One tensor of the stream: its name, dtype and shape, and where its bytes travel."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[TensorPiece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class SyncHeader(BaseModel):
    """Everything a receiver needs to check a sync before any data moves."""

    model_config = ConfigDict(frozen=True)

    protocol_version: int = PROTOCOL_VERSION
    sync_id: str
    weights_version: int
    scheme: QuantScheme
    layout: str = "checkpoint"
    bucket_sizes: tuple[int, ...]
    entries: tuple[ManifestEntry, ...]
    checksum: bool = False

    @property
    def total_bytes(self) -> int:
        """Bytes on the wire: the buckets, alignment padding included."""
        return sum(self.bucket_sizes)

    @property
    def payload_bytes(self) -> int:
        """Bytes of tensor data the manifest describes."""
        return sum(e.nbytes for e in self.entries)

    @property
    def max_bucket_size(self) -> int:
        return max(self.bucket_sizes, default=0)
