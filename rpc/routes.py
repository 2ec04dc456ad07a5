"""layercast's HTTP routes, independent of the engine behind them.

`build_router(get_backend, token, gate)` returns a FastAPI router with `/init_broadcaster`,
`/update_weights` and `/weights`. The engine-specific work is done by a `WeightSyncBackend` (the vLLM
one lives in `inference_worker`). This module owns what every server must do the same way: bearer-token
auth on admin routes (constant-time compare, the token never logged), one sync at a time (409 for a
second), a sync applied only while no generation runs (it holds the `WeightsGate` exclusive), and
mapping backend errors to status codes with a message that names the cause.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Protocol

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse

from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from rpc.errors import ApiError, Conflict
from rpc.weights_gate import WeightsGate

# How long a sync waits for running generation to finish when its request sets no timeout.
DEFAULT_DRAIN_TIMEOUT_S = 600.0


class WeightSyncBackend(Protocol):
    async def init_broadcaster(self, req: InitBroadcasterRequest) -> InitBroadcasterResponse: ...

    async def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse: ...

    def status(self) -> WeightsStatus: ...


def bearer_auth(token: str | None) -> Callable[[Request], None]:
    """A dependency that demands `Authorization: Bearer <token>` when a token is configured."""

    def check(request: Request) -> None:
        if not token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(
                status_code=401,
                detail="missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(status_code=403, detail="wrong bearer token")

    return check


def _error(exc: ApiError) -> JSONResponse:
    body = {"error": type(exc).__name__, "detail": str(exc)}
    return JSONResponse(status_code=exc.status_code, content=body)


def build_router(
    get_backend: Callable[[], WeightSyncBackend], token: str | None, gate: WeightsGate | None = None
) -> APIRouter:
    router = APIRouter(tags=["layercast"])
    gate = gate or WeightsGate()
    admin = [Depends(bearer_auth(token))]
    sync_lock = asyncio.Lock()

    @router.post("/init_broadcaster", dependencies=admin, response_model=InitBroadcasterResponse)
    async def init_broadcaster(req: InitBroadcasterRequest) -> InitBroadcasterResponse | JSONResponse:
        if sync_lock.locked():
            return _error(Conflict("a sync or an init is in progress; retry when it ends"))
        async with sync_lock:
            try:
                return await get_backend().init_broadcaster(req)
            except ApiError as exc:
                return _error(exc)

    @router.post("/update_weights", dependencies=admin, response_model=UpdateWeightsResponse)
    async def update_weights(req: UpdateWeightsRequest) -> UpdateWeightsResponse | JSONResponse:
        if sync_lock.locked():
            return _error(Conflict("another sync or init is in progress on this server"))
        async with sync_lock:
            try:
                async with gate.sync(req.timeout_s or DEFAULT_DRAIN_TIMEOUT_S):
                    return await get_backend().update_weights(req)
            except ApiError as exc:
                return _error(exc)

    @router.get("/weights", response_model=WeightsStatus)
    async def weights() -> WeightsStatus:
        return get_backend().status()

    return router
