"""Request and response bodies of layercast's HTTP API (`/init_broadcaster`, `/update_weights`, ...).

Shared by the server routes (`rpc`), the inference worker (which receives these as plain dicts through
vLLM's `collective_rpc`) and the trainer/orchestrator client, so every role validates the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs.quant import QuantScheme

LoadPath = Literal["kernel", "checkpoint", "layerwise"]
LoadPathRequest = Literal["auto", "kernel", "checkpoint", "layerwise"]
Backend = Literal["auto", "nccl", "gloo", "ipc"]
ServerState = Literal["uninitialized", "ready", "syncing", "torn", "failed"]

_SYNC_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


class _Strict(BaseModel):
    """Request bodies: unknown fields are errors, and so are coerced types (`true` or `"7"` for an
    int, `"2"` for a float); an int is still a float. A nested `QuantScheme` keeps its own (lax) config:
    its tuples arrive as JSON lists."""

    model_config = ConfigDict(extra="forbid", strict=True)


class InitBroadcasterRequest(_Strict):
    """Join every worker of this server to the trainer's broadcast group."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected `group_secret` is not echoed

    master_address: str = Field(min_length=1, max_length=253)
    master_port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2, le=65536)
    rank_offset: int = Field(ge=1, description="rank of this server's first worker (TP rank 0)")
    scheme: QuantScheme = QuantScheme()
    load_path: LoadPathRequest = "auto"
    backend: Backend = Field(
        default="auto",
        description="nccl (GPU), gloo (CPU), or ipc: trainer and every server worker on ONE device "
        "(colocated), buckets through shared memory (CUDA IPC / /dev/shm); auto: decided at the rendezvous "
        "from every rank's device: gloo when any rank is on a CPU, ipc when every worker is on the "
        "trainer's GPU, nccl when every rank has a GPU of its own (a mix is refused, naming the ranks)",
    )
    rendezvous_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    step_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    checksum: bool = False
    trainer_id: str | None = Field(
        default=None,
        pattern=_SYNC_ID_PATTERN,
        description="who is joining (the trainer's own id): a server in the live group of another "
        "trainer refuses with 409 unless `takeover`",
    )
    takeover: bool = Field(
        default=False,
        description="replace the live group of another trainer; that trainer's next call fails at once, "
        "naming the takeover",
    )
    group_secret: str | None = Field(
        default=None,
        min_length=32,
        max_length=128,
        pattern=r"^[0-9a-fA-F]+$",
        repr=False,
        description="hex secret of this group generation: only ranks proving it are admitted (never logged)",
    )

    @model_validator(mode="after")
    def _ranks_fit(self) -> InitBroadcasterRequest:
        if self.rank_offset >= self.world_size:
            raise ValueError(
                f"rank_offset={self.rank_offset} must be < world_size={self.world_size} "
                "(rank 0 is the trainer)"
            )
        return self


class RuntimeTensor(BaseModel):
    """One parameter of the live vLLM model (the kernel-quantized path's manifest)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


class InitBroadcasterResponse(BaseModel):
    ranks: list[int]
    load_path: LoadPath
    load_path_reason: str
    tensor_parallel_size: int
    runtime_manifest: list[RuntimeTensor] | None = None


class UpdateWeightsRequest(_Strict):
    """Receive one sync from the trainer; answers when it has been loaded (or refused)."""

    sync_id: str = Field(pattern=_SYNC_ID_PATTERN)
    weights_version: int = Field(ge=0)
    timeout_s: float | None = Field(default=None, gt=0, le=86400)
    force: bool = Field(
        default=False,
        description="apply even when this sync id already landed here or weights_version is older than "
        "the served one (both refused with 409 otherwise)",
    )


class SyncTimings(BaseModel):
    """Seconds spent per phase of one sync, as seen by one server (max over its workers)."""

    wait_s: float = 0.0
    receive_s: float = 0.0
    load_s: float = 0.0
    commit_s: float = 0.0
    total_s: float = 0.0


class UpdateWeightsResponse(BaseModel):
    sync_id: str
    weights_version: int
    load_path: LoadPath
    bytes_received: int
    num_tensors: int
    timings: SyncTimings


class WeightsStatus(BaseModel):
    state: ServerState
    num_workers: int | None = Field(default=None, description="ranks this server needs in the group")
    weights_version: int | None
    scheme: QuantScheme | None
    load_path: LoadPath | None
    last_sync_id: str | None = None
    last_timings: SyncTimings | None = None
    last_error: str | None = None
    trainer_id: str | None = Field(
        default=None, description="the trainer whose broadcast group this server joined last"
    )
    armed_sync_id: str | None = Field(
        default=None, description="the sync waiting for its trainer (generation goes on meanwhile)"
    )


class ErrorBody(BaseModel):
    error: str
    detail: str | None = None
