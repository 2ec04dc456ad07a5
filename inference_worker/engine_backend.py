"""The vLLM implementation of `rpc.routes.WeightSyncBackend`: HTTP calls become worker RPCs.

Every worker of the server runs the same `layercast_*` method of `LayercastWorkerExtension` through
`EngineClient.collective_rpc`; the worker never raises through the RPC (it returns a result dict with
`ok`, `error`, `kind`, `torn`), so a failure is reported with its real cause rather than a generic engine
error. While the RPC runs, vLLM's engine core runs no forward pass, so no request sees a half-loaded
model; a sync that fails after loading started leaves the server `torn`, and the generation routes
answer 503 until a complete sync lands.
"""

from __future__ import annotations

import time
from typing import Any

from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    RuntimeTensor,
    SyncTimings,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from rpc.errors import ApiError, BadRequest, Conflict, NotReady, SyncFailed, SyncTimedOut

_ERROR_KINDS: dict[str, type[ApiError]] = {
    "bad_request": BadRequest,
    "refused": Conflict,
    "timeout": SyncTimedOut,
    "not_ready": NotReady,
    "failed": SyncFailed,
}


def _raise_first_error(results: list[dict[str, Any]], what: str) -> None:
    for rank, res in enumerate(results):
        if not res.get("ok"):
            kind = _ERROR_KINDS.get(str(res.get("kind")), SyncFailed)
            raise kind(f"{what} failed on worker {rank}: {res.get('error')}")


class VllmSyncBackend:
    """Holds the server-level view of the weights (version, state) across its workers."""

    def __init__(self, engine_client: Any) -> None:
        self._engine = engine_client
        parallel = engine_client.vllm_config.parallel_config
        self._status = WeightsStatus(
            state="uninitialized",
            num_workers=parallel.world_size * parallel.data_parallel_size,
            weights_version=None,
            scheme=None,
            load_path=None,
        )
        self._init: InitBroadcasterRequest | None = None

    def status(self) -> WeightsStatus:
        return self._status

    def _set(self, **changes: Any) -> None:
        self._status = self._status.model_copy(update=changes)

    async def _rpc(self, method: str, rpc_timeout_s: float | None, **kwargs: Any) -> list[dict[str, Any]]:
        return list(await self._engine.collective_rpc(method, timeout=rpc_timeout_s, kwargs=kwargs))

    async def init_broadcaster(self, req: InitBroadcasterRequest) -> InitBroadcasterResponse:
        if self._status.state == "syncing":
            raise Conflict("a sync is in progress")
        results = await self._rpc(
            "layercast_init", req.rendezvous_timeout_s + 60.0, request=req.model_dump(mode="json")
        )
        try:
            _raise_first_error(results, "init_broadcaster")
        except ApiError as exc:
            self._set(last_error=str(exc), state="failed" if self._status.state != "torn" else "torn")
            raise
        first = results[0]
        self._init = req
        state = "torn" if self._status.state == "torn" else "ready"
        self._set(state=state, scheme=req.scheme, load_path=first["load_path"], last_error=None)
        manifest = first.get("runtime_manifest")
        return InitBroadcasterResponse(
            ranks=[int(r["rank"]) for r in results],
            load_path=first["load_path"],
            load_path_reason=first["load_path_reason"],
            tensor_parallel_size=len(results),
            runtime_manifest=[RuntimeTensor(**t) for t in manifest] if manifest else None,
        )

    async def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        if self._init is None:
            raise NotReady("call /init_broadcaster first: this server has not joined a broadcast group")
        timeout = req.timeout_s or self._init.step_timeout_s * 10
        self._set(state="syncing")
        started = time.perf_counter()
        try:
            results = await self._rpc(
                "layercast_receive",
                timeout + 30.0,
                sync_id=req.sync_id,
                weights_version=req.weights_version,
                timeout_s=timeout,
            )
        except Exception as exc:  # the engine itself failed (dead worker, RPC timeout)
            self._set(state="torn", last_error=f"worker RPC failed: {exc}")
            raise SyncFailed(f"update_weights: worker RPC failed: {exc}") from exc
        torn = any(r.get("torn") for r in results)
        failed = [r for r in results if not r.get("ok")]
        if failed:
            # Untouched weights keep serving; torn ones refuse generation until a full sync lands.
            prev = self._status.state
            state = "torn" if torn or prev == "torn" else "ready"
            self._set(state=state, last_error=str(failed[0].get("error")), last_sync_id=req.sync_id)
            _raise_first_error(results, f"sync {req.sync_id}")
        # KV blocks computed with the old weights must not be reused by prefix caching.
        await self._engine.reset_prefix_cache()
        timings = SyncTimings(
            **{k: max(float(r["timings"].get(k, 0.0)) for r in results) for k in SyncTimings.model_fields}
        )
        timings.total_s = max(timings.total_s, time.perf_counter() - started)
        self._set(
            state="ready",
            weights_version=req.weights_version,
            last_sync_id=req.sync_id,
            last_timings=timings,
            last_error=None,
        )
        return UpdateWeightsResponse(
            sync_id=req.sync_id,
            weights_version=req.weights_version,
            load_path=results[0]["load_path"],
            bytes_received=int(results[0]["bytes_received"]),
            num_tensors=int(results[0]["num_tensors"]),
            timings=timings,
        )
