"""Bodies of `POST /check`: the server half of `layercast check`, a dry run that sends no weights.

The trainer (the `layercast check` command) describes what it would send: the load path it asks for
and its stream's manifest in checkpoint names (`checkpoint_manifest`) and fused into the runtime
layout (`kernel_manifest`). The server answers, without joining a group or touching the weights, which
load path `/init_broadcaster` would choose and why, its runtime manifest, and each manifest's problems
as its loaders would report them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from configs.api import LoadPath, LoadPathRequest, RuntimeTensor, ServerState

# Strict items (no `"7"` or `true` for a dimension); the tuples themselves arrive as JSON lists.
ManifestRow = tuple[StrictStr, StrictStr, tuple[StrictInt, ...]]


class CheckRequest(BaseModel):
    """What the trainer would send: `[name, dtype, shape]` entries (dtype as `bfloat16`, `float8_e4m3fn`)."""

    model_config = ConfigDict(extra="forbid")

    load_path: LoadPathRequest = "auto"
    checkpoint_manifest: list[ManifestRow] | None = Field(
        default=None, description="the stream in HF checkpoint names (checkpoint and layerwise paths)"
    )
    kernel_manifest: list[ManifestRow] | None = Field(
        default=None, description="the stream fused into vLLM's runtime layout (kernel path)"
    )


class CheckResponse(BaseModel):
    load_path: LoadPath | None = Field(description="what /init_broadcaster would choose; None: refused")
    load_path_reason: str = Field(description="why that path, or why the request cannot be served")
    num_workers: int
    state: ServerState
    weights_version: int | None
    runtime_manifest: list[RuntimeTensor] = Field(description="the live model's tensors (worker 0)")
    checkpoint_problem: str | None = Field(
        default=None, description="why the checkpoint manifest does not fit (None: it fits or none sent)"
    )
    kernel_problem: str | None = Field(
        default=None, description="why the kernel manifest does not fit (None: it fits or none sent)"
    )
