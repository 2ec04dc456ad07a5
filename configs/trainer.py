"""Configuration of the trainer's `WeightBroadcaster` (which servers, where to rendezvous, limits)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from configs.api import Backend, LoadPathRequest

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


class BroadcasterConfig(BaseModel):
    """`inference_config` is the *inference* model's HF config: a model directory, a config.json path,
    or the parsed dict; its `quantization_config` decides what the trainer sends."""

    model_config = ConfigDict(extra="forbid")

    servers: list[str] = Field(min_length=1, description="base URLs of the inference servers")
    inference_config: str | dict[str, Any]
    master_address: str = "127.0.0.1"
    master_port: int = Field(default=29551, ge=1, le=65535)
    backend: Backend = Field(
        default="auto",
        description="nccl (GPU), gloo (CPU), or ipc: trainer and every server worker on ONE device "
        "(colocated), buckets through shared memory (CUDA IPC / /dev/shm); auto: decided at the rendezvous "
        "from every rank's device: gloo when any rank is on a CPU, ipc when every worker is on the "
        "trainer's GPU, nccl when every rank has a GPU of its own (a mix is refused, naming the ranks)",
    )
    load_path: LoadPathRequest = "auto"
    bucket_bytes: int = Field(default=DEFAULT_BUCKET_BYTES, ge=1024)
    rendezvous_timeout_s: float = Field(default=120.0, gt=0)
    step_timeout_s: float = Field(default=120.0, gt=0)
    sync_timeout_s: float = Field(default=600.0, gt=0)
    http_timeout_s: float = Field(default=30.0, gt=0)
    checksum: bool = False
    takeover: bool = Field(
        default=False,
        description="join servers that are in another trainer's live group (that trainer's next call "
        "fails, naming the takeover); off: such servers refuse with 409",
    )
    token: str | None = Field(default=None, repr=False)
    direct_write: bool = Field(
        default=True,
        description="unsharded models: quantize each tensor straight into its bucket (no intermediate "
        "tensors); off: always stream through the layer walker",
    )
    senders: Literal["rank0", "every_rank"] = Field(
        default="rank0",
        description="who sends on a multi-rank (FSDP2) trainer. rank0: rank 0 sends to every server, the "
        "other ranks only run the per-layer gathers with it. every_rank: each rank sends to its own "
        "`servers` (the server on its own GPU: one TP=1 server per GPU, backend ipc) in its own group "
        "(its own master_port): the per-layer gather is the only collective among trainer ranks",
    )
    send_dtype: str | None = Field(
        default=None, description="cast unquantized tensors to this dtype (e.g. bfloat16); None keeps them"
    )
