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


class SharedBufferHandle(BaseModel):
    """Where another process on the same device finds a buffer the sender shares with it (the `ipc`
    backend): plain typed fields, never a pickled object. `kind` says which fields matter:
    `cuda_ipc` a CUDA IPC memory handle (the allocation's handle, the buffer's offset in it, and torch's
    producer-side reference counter, as `torch.UntypedStorage._share_cuda_()` gives them);
    `cpu_shm` a file under /dev/shm mapped shared by both sides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str = Field(pattern="^(cuda_ipc|cpu_shm)$")
    device_id: str = Field(min_length=1)
    nbytes: int = Field(gt=0)
    path: str = ""
    handle_b64: str = ""
    storage_bytes: int = Field(default=0, ge=0)
    offset_bytes: int = Field(default=0, ge=0)
    ref_counter_b64: str = ""
    ref_counter_offset: int = Field(default=0, ge=0)
    event_b64: str = ""
    event_sync_required: bool = False


class SharedSlots(BaseModel):
    """One generation of the sender's shared bucket slots (published once, re-published when they grow)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    generation: int = Field(ge=0)
    slots: tuple[SharedBufferHandle, ...]


class SharedBroadcast(BaseModel):
    """What rank 0 publishes for its n-th broadcast on the `ipc` backend: the bytes themselves when small
    (`inline_b64`), else which slot of which slot generation holds them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    nbytes: int = Field(ge=0)
    inline_b64: str | None = None
    generation: int = Field(default=0, ge=0)
    slot: int = Field(default=0, ge=0)
