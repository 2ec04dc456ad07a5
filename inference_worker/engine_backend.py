"""The vLLM implementation of `rpc.server.routes.WeightSyncBackend`: HTTP calls become worker RPCs.

Every worker of the server runs the same `layercast_*` method of `LayercastWorkerExtension` through
`WorkerRpc` (tagged, bounded `collective_rpc`: a late answer never reaches a later call); the worker
never raises through the RPC (it answers a typed `worker_results` model: `ok`, `kind`, `error`,
`torn`), so a failure is reported with its real cause rather than a generic engine error. A sync has
two phases:
- `wait_for_trainer`: poll the workers (store reads, no collective) until the trainer announces the
  sync; the engine keeps generating meanwhile, and the generation gate is not held;
- `update_weights`: one `layercast_receive` RPC that checks the header, votes, receives and loads.
  While it runs, vLLM's engine core runs no forward pass, so no request sees a half-loaded model; a
  sync that fails after loading started leaves the server `torn`, and the generation routes answer
  503 until a complete sync lands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    SyncTimings,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from inference_worker.sleep_state import SleepState
from inference_worker.worker_results import ErrorKind, InitResult, PollResult, ReceiveResult, WorkerResult
from inference_worker.worker_rpc import WorkerRpc
from rpc.errors import ApiError, BadRequest, Conflict, NotReady, SyncError, SyncTimedOut

# Polling the workers for the trainer's announcement: first after this, doubling up to the cap. The cap
# bounds what an armed sync adds to a sync's fixed cost (a 20 ms cap measured +30 ms per small sync on
# CPU, 5 ms +13 ms: bench/results/2026-12-07-cpu-demo-fixed-cost-ab.txt) against at most 200 polls a second
# while armed (each a utility call between engine steps).
POLL_FIRST_S = 1e-3
POLL_MAX_S = 5e-3
# A poll is store reads on the worker (each bounded by the store's operation timeout).
POLL_RPC_DEADLINE_S = 10.0

_ERROR_KINDS: dict[ErrorKind, type[ApiError]] = {
    "bad_request": BadRequest,
    "refused": Conflict,
    "timeout": SyncTimedOut,
    "not_ready": NotReady,
    "failed": SyncError,
}


def _raise_first_error(results: Sequence[WorkerResult], what: str) -> None:
    for rank, res in enumerate(results):
        if not res.ok:
            kind = _ERROR_KINDS.get(res.kind or "failed", SyncError)
            raise kind(f"{what} failed on worker {rank}: {res.error}")


class VllmSyncBackend:
    """Holds the server-level view of the weights (version, state) across its workers."""

    def __init__(self, engine_client: Any) -> None:
        self._engine = engine_client
        self.rpc = WorkerRpc(engine_client)
        self.sleep = SleepState(engine_client)
        parallel = engine_client.vllm_config.parallel_config
        self._status = WeightsStatus(
            state="uninitialized",
            num_workers=parallel.world_size * parallel.data_parallel_size,
            weights_version=None,
            scheme=None,
            load_path=None,
        )
        self._init: InitBroadcasterRequest | None = None
        self._deadline: tuple[str, float] | None = None  # the armed sync's id and monotonic deadline
        self._before: str = "uninitialized"  # the state a running sync started from

    def status(self) -> WeightsStatus:
        return self._status

    def health_problem(self) -> str | None:
        return self.rpc.health_problem()

    def _set(self, **changes: Any) -> None:
        self._status = self._status.model_copy(update=changes)

    async def init_broadcaster(self, req: InitBroadcasterRequest) -> InitBroadcasterResponse:
        if self._status.state == "syncing":
            raise Conflict("a sync is in progress")
        results = await self.rpc.call(
            "layercast_init", req.rendezvous_timeout_s + 60.0, InitResult, request=req.model_dump(mode="json")
        )
        try:
            _raise_first_error(results, "init_broadcaster")
        except Conflict:
            raise  # another trainer's group is live: this server's state is untouched
        except ApiError as exc:
            self._set(last_error=str(exc), state="failed" if self._status.state != "torn" else "torn")
            raise
        first = results[0]
        assert first.load_path is not None  # an ok init names its path
        self._init = req
        state = "torn" if self._status.state == "torn" else "ready"
        self._set(
            state=state,
            scheme=req.scheme,
            load_path=first.load_path,
            last_error=None,
            trainer_id=req.trainer_id,
        )
        return InitBroadcasterResponse(
            ranks=[int(r.rank or 0) for r in results],
            load_path=first.load_path,
            load_path_reason=first.load_path_reason,
            tensor_parallel_size=len(results),
            runtime_manifest=first.runtime_manifest,
        )

    def _timeout_s(self, req: UpdateWeightsRequest) -> float:
        assert self._init is not None
        return req.timeout_s or self._init.step_timeout_s * 10

    async def wait_for_trainer(self, req: UpdateWeightsRequest) -> float:
        """Wait, without blocking generation, until the trainer announces sync `req.sync_id` (or
        cancels it, or the group dies); returns how long the caller may then wait for running generation
        to drain (the trainer is waiting for this server meanwhile, at most its step deadline)."""
        if self._init is None:
            raise NotReady("call /init_broadcaster first: this server has not joined a broadcast group")
        timeout = self._timeout_s(req)
        deadline = time.monotonic() + timeout
        self._before = self._status.state
        self._set(state="syncing", armed_sync_id=req.sync_id)
        try:
            await self._poll_until_announced(req, timeout, deadline)
        except BaseException:
            self._set(state=self._before, armed_sync_id=None)  # nothing was loaded
            raise
        self._set(armed_sync_id=None)
        self._deadline = (req.sync_id, deadline)
        left = deadline - time.monotonic()
        return max(0.0, min(left, self._init.step_timeout_s / 2))

    async def _poll_until_announced(self, req: UpdateWeightsRequest, timeout: float, deadline: float) -> None:
        assert self._init is not None
        nap = POLL_FIRST_S
        while True:
            results = await self.rpc.call(
                "layercast_poll", POLL_RPC_DEADLINE_S, PollResult, sync_id=req.sync_id
            )
            failed = [r for r in results if not r.ok]
            if failed:
                self._set(last_error=failed[0].error)
                _raise_first_error(results, f"sync {req.sync_id}")
            if all(r.announced for r in results):
                return
            if time.monotonic() + nap > deadline:
                raise SyncTimedOut(
                    f"sync {req.sync_id}: the trainer did not start it within {timeout:.1f} s (no header "
                    "announced); nothing was loaded and the server keeps its weights and its group"
                )
            await asyncio.sleep(nap)
            nap = min(nap * 2, POLL_MAX_S)

    async def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        if self._init is None:
            raise NotReady("call /init_broadcaster first: this server has not joined a broadcast group")
        armed, self._deadline = self._deadline, None
        if armed is not None and armed[0] == req.sync_id:
            timeout = max(armed[1] - time.monotonic(), self._init.step_timeout_s)
        else:
            timeout = self._timeout_s(req)
        if self._status.state != "syncing":  # not armed through wait_for_trainer
            self._before = self._status.state
            self._set(state="syncing")
        started = time.perf_counter()
        # Refused in the accept vote (not before it), so the trainer learns why at once and the group
        # stays usable: nothing is loaded into weights vLLM has put to sleep.
        asleep = await self.sleep.problem()
        try:
            results = await self.rpc.call(
                "layercast_receive",
                timeout,
                ReceiveResult,
                sync_id=req.sync_id,
                weights_version=req.weights_version,
                timeout_s=timeout,
                refuse=asleep or "",
            )
        except ApiError as exc:  # the engine itself failed (dead worker) or overran its deadline
            self._set(state="torn", last_error=f"worker RPC failed: {exc}")
            raise
        torn = any(r.torn for r in results)
        failed = [r for r in results if not r.ok]
        if failed:
            # Untouched weights keep serving; torn ones refuse generation until a full sync lands.
            state = "torn" if torn or self._before == "torn" else "ready"
            # last_sync_id stays the last sync that landed: a failed one can be retried under its id.
            self._set(state=state, last_error=failed[0].error)
            _raise_first_error(results, f"sync {req.sync_id}")
        # KV blocks computed with the old weights must not be reused by prefix caching.
        await self._engine.reset_prefix_cache()
        timings = SyncTimings(
            **{k: max(getattr(r.timings, k) for r in results) for k in SyncTimings.model_fields}
        )
        timings.total_s = max(timings.total_s, time.perf_counter() - started)
        self._set(
            state="ready",
            weights_version=req.weights_version,
            last_sync_id=req.sync_id,
            last_timings=timings,
            last_error=None,
        )
        load_path = results[0].load_path
        assert load_path is not None  # an ok receive names the path it loaded by
        return UpdateWeightsResponse(
            sync_id=req.sync_id,
            weights_version=req.weights_version,
            load_path=load_path,
            bytes_received=results[0].bytes_received,
            num_tensors=results[0].num_tensors,
            timings=timings,
        )
