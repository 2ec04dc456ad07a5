"""What each `layercast_*` worker call answers, as typed models (one per call).

Results cross the process boundary between a vLLM worker and the API server through `collective_rpc`,
which carries plain msgpack-able data: the worker builds one of these models and sends its JSON-mode
dump (`inference_worker.worker_rpc.tagged` adds the caller's `call_id`); the API side validates each
worker's answer back into the model (`WorkerRpc.call(..., result=...)`). A call never raises through
the RPC: a failure is `ok=False` with its `kind` (which HTTP error it becomes) and `error` (the cause).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from configs.api import LoadPath, RuntimeTensor, SyncTimings

# bad_request 400, refused 409, timeout 504, not_ready 503, failed 502 (`engine_backend`).
ErrorKind = Literal["bad_request", "refused", "timeout", "not_ready", "failed"]


class WorkerResult(BaseModel):
    """The part every answer has. `torn`: this worker's weights are partly loaded (it must not serve)."""

    model_config = ConfigDict(extra="forbid")

    ok: bool
    kind: ErrorKind | None = None
    error: str = ""
    torn: bool = False
    call_id: str = ""


def runtime_layout(manifest: Iterable[tuple[str, str, Sequence[int]]]) -> list[RuntimeTensor]:
    """`load_paths.runtime_manifest`'s `(name, dtype, shape)` triples as the typed entries answered."""
    return [RuntimeTensor(name=n, dtype=d, shape=tuple(s)) for n, d, s in manifest]


def failure(kind: ErrorKind, error: str, *, torn: bool = False) -> WorkerResult:
    """A failed answer of any call (every call's result model accepts it)."""
    return WorkerResult(ok=False, kind=kind, error=error, torn=torn)


class InitResult(WorkerResult):
    """`layercast_init`: the rank this worker took and the load path it will use."""

    rank: int | None = None
    load_path: LoadPath | None = None
    load_path_reason: str = ""
    runtime_manifest: list[RuntimeTensor] | None = None


class PollResult(WorkerResult):
    """`layercast_poll`: whether the trainer has started (announced) the sync asked about."""

    announced: bool = False


class ReceiveResult(WorkerResult):
    """`layercast_receive`: what was loaded; `peer_error` when only other servers failed the commit."""

    load_path: LoadPath | None = None
    bytes_received: int = 0
    num_tensors: int = 0
    timings: SyncTimings = SyncTimings()
    load_stats: dict[str, Any] = {}
    peer_error: str | None = None


class CheckResult(WorkerResult):
    """`layercast_check` (the dry run): the path `/init_broadcaster` would choose, manifest problems."""

    load_path: LoadPath | None = None
    load_path_reason: str = ""
    runtime_manifest: list[RuntimeTensor] = []
    checkpoint_problem: str | None = None
    kernel_problem: str | None = None
