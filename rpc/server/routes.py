"""layercast's HTTP routes, independent of the engine behind them.

`build_router(get_backend, token, ...)` returns a FastAPI router with `/init_broadcaster`,
`/update_weights`, `/weights` (and `/check`). The engine-specific work is done by a `WeightSyncBackend`
(the vLLM one lives in `inference_worker`). This module owns what every server must do the same way:
bearer-token auth on admin routes (constant-time compare, the token never logged), one sync at a time
(409 for a second), an armed sync that never blocks generation while it waits for its trainer, a sync
applied only while no generation runs (it holds the `WeightsGate` exclusive from the trainer's arrival
until the new version is recorded), and mapping backend errors to status codes with a message that
names the cause. After every `/update_weights` it logs one line and tells the router's observers
(metrics) what happened (`rpc.server.sync_events.SyncEvent`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from configs.api import (
    ErrorBody,
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from configs.check import CheckRequest, CheckResponse
from rpc.errors import ApiError, Conflict, SyncTimedOut
from rpc.server import sync_guard
from rpc.server.auth import check_bearer
from rpc.server.sync_events import Outcome, SyncEvent, SyncObserver, log_sync_event
from rpc.server.weights_gate import WeightsGate

_log = logging.getLogger("layercast.server")


class WeightSyncBackend(Protocol):
    async def init_broadcaster(self, req: InitBroadcasterRequest) -> InitBroadcasterResponse: ...

    async def wait_for_trainer(self, req: UpdateWeightsRequest) -> float:
        """Wait (generation going on) until the trainer starts sync `req`; returns how long running
        generation may then take to drain before the sync must start loading."""
        ...

    async def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse: ...

    def status(self) -> WeightsStatus: ...

    def health_problem(self) -> str | None:
        """Why the server cannot take part in syncs now (reported by `/health` as 503), or None."""
        ...


class DryRunBackend(Protocol):
    async def check(self, req: CheckRequest) -> CheckResponse: ...


# Declares the scheme in the OpenAPI schema (vLLM's /docs shows the lock); the check itself is ours.
_BEARER = HTTPBearer(auto_error=False, description="the server's LAYERCAST_ADMIN_TOKEN, when one is set")


def bearer_auth(token: str | None) -> Callable[..., None]:
    """A dependency that demands `Authorization: Bearer <token>` when a token is configured (the same
    check `rpc.server.middleware.AdminGuard` makes before reading the body:
    `rpc.server.auth.check_bearer`)."""

    def check(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        failure = check_bearer(request.headers.get("authorization"), token)
        if failure is not None:
            raise HTTPException(failure.status_code, detail=failure.detail, headers=failure.headers or None)

    return check


def _responses(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers of an admin route: 401/403 (`{"detail": ...}`) and the
    backend's errors (`ErrorBody`), each `_CODE="when"`."""
    out: dict[int | str, dict[str, Any]] = {
        401: {"description": "no bearer token (when the server has one)"},
        403: {"description": "wrong bearer token"},
    }
    return out | {int(code[1:]): {"model": ErrorBody, "description": text} for code, text in codes.items()}


def _error(exc: ApiError) -> JSONResponse:
    body = {"error": type(exc).__name__, "detail": str(exc)}
    return JSONResponse(status_code=exc.status_code, content=body)


def _state(get_backend: Callable[[], WeightSyncBackend]) -> str | None:
    try:
        return get_backend().status().state
    except ApiError:
        return None


def _failure_outcome(exc: ApiError, before: str | None, after: str | None) -> Outcome:
    if after == "torn" and before != "torn":
        return "torn"
    if isinstance(exc, SyncTimedOut):
        return "timed_out"
    if isinstance(exc, Conflict):  # the backend raises Conflict when a receiver refused the header
        return "refused"
    return "error"


def _notify(observers: Sequence[SyncObserver], event: SyncEvent) -> None:
    for observe in observers:
        try:
            observe(event)
        except Exception:  # an observer never breaks a sync's answer
            _log.exception("sync observer %r failed", observe)


def build_router(
    get_backend: Callable[[], WeightSyncBackend],
    token: str | None,
    observers: Sequence[SyncObserver] = (),
    get_checker: Callable[[], DryRunBackend] | None = None,
    gate: WeightsGate | None = None,
) -> APIRouter:
    """The routes; `observers` are called with a `SyncEvent` after every `/update_weights` that ran
    (a 409 for a concurrent call is not a sync), after the sync's log line. With `get_checker`, also
    `POST /check` (the dry run of `layercast check`)."""
    router = APIRouter(tags=["layercast"])
    gate = gate or WeightsGate()
    sync_observers = (log_sync_event, *observers)
    admin = [Depends(bearer_auth(token))]
    sync_lock = asyncio.Lock()

    @router.post(
        "/init_broadcaster",
        dependencies=admin,
        response_model=InitBroadcasterResponse,
        responses=_responses(
            _400="the request cannot be served (e.g. the load path asked for is refused, with the reason)",
            _409="a sync or an init is in progress",
            _503="the engine is not up yet",
            _504="the rendezvous passed its deadline",
        ),
    )
    async def init_broadcaster(req: InitBroadcasterRequest) -> InitBroadcasterResponse | JSONResponse:
        """Join every worker of this server to the trainer's broadcast group (a rendezvous: the trainer
        and every server call at once). Answers the ranks taken and the load path chosen, with why."""
        if sync_lock.locked():
            return _error(Conflict("a sync or an init is in progress; retry when it ends"))
        async with sync_lock:
            try:
                return await get_backend().init_broadcaster(req)
            except ApiError as exc:
                return _error(exc)

    @router.post(
        "/update_weights",
        dependencies=admin,
        response_model=UpdateWeightsResponse,
        responses=_responses(
            _409="another sync or init is in progress, or a receiver refused the trainer's header "
            "(the reason is named; nothing was loaded), or, unless `force`, this sync id already landed "
            "here or weights_version is older than the served one",
            _502="the sync failed (the reason is named); if loading had begun, the server is torn",
            _503="not initialised: call /init_broadcaster first",
            _504="a deadline passed (what was waited for, and how long, is named)",
        ),
    )
    async def update_weights(req: UpdateWeightsRequest) -> UpdateWeightsResponse | JSONResponse:
        """Receive one sync from the trainer and load it; answers when it is loaded (or refused).
        Logged in one line and counted in layercast's Prometheus metrics."""
        if sync_lock.locked():
            return _error(Conflict("another sync or init is in progress on this server"))
        async with sync_lock:
            if (refused := sync_guard.check(lambda: get_backend().status(), req)) is not None:
                return _error(refused)  # this sync id already landed, or the version goes back
            started = time.perf_counter()
            before = _state(get_backend)
            try:
                # Armed, generation goes on; the gate is held only once the trainer is here.
                drain_s = await get_backend().wait_for_trainer(req)
                async with gate.sync(drain_s):
                    resp = await get_backend().update_weights(req)
            except ApiError as exc:
                event = SyncEvent(
                    sync_id=req.sync_id,
                    weights_version=req.weights_version,
                    outcome=_failure_outcome(exc, before, _state(get_backend)),
                    seconds=time.perf_counter() - started,
                    error=f"{type(exc).__name__} ({exc.status_code}): {exc}",
                )
                _notify(sync_observers, event)
                return _error(exc)
            event = SyncEvent(
                sync_id=resp.sync_id,
                weights_version=resp.weights_version,
                outcome="ok",
                seconds=time.perf_counter() - started,
                bytes_received=resp.bytes_received,
                num_tensors=resp.num_tensors,
                load_path=resp.load_path,
                timings=resp.timings,
            )
            _notify(sync_observers, event)
            return resp

    if get_checker is not None:
        checker = get_checker

        @router.post(
            "/check",
            dependencies=admin,
            response_model=CheckResponse,
            responses=_responses(_409="a sync or an init is in progress"),
        )
        async def check(req: CheckRequest) -> CheckResponse | JSONResponse:
            """Dry run: the load path `/init_broadcaster` would choose and whether the trainer's
            manifest fits, without joining a group or touching the weights."""
            if sync_lock.locked():
                return _error(Conflict("a sync or an init is in progress; retry when it ends"))
            try:
                return await checker().check(req)
            except ApiError as exc:
                return _error(exc)

    @router.get("/weights", response_model=WeightsStatus)
    async def weights() -> WeightsStatus:
        """State of the weights (`uninitialized`, `ready`, `syncing`, `torn`, `failed`), the version
        served, the scheme, the load path, the last sync's timings and the last error. No auth."""
        return get_backend().status()

    return router
