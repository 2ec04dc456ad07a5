"""ASGI middlewares every layercast server installs in front of the app (engine-independent).

- `AdminGuard`: in front of every admin route (`ADMIN_PATHS`: those of `rpc.server.routes` with the bearer
  dependency), authenticates first (`rpc.server.auth.check_bearer`, the same check as the route dependency):
  a request without the server's bearer token gets its 401/403, rendered by the app's own HTTPException
  handler so it is the very answer the dependency gives, before a single body byte is read. Then it caps
  the body at `MAX_ADMIN_BODY_BYTES` (declared or streamed): larger bodies get 413 before anything
  parses them.
- `GenerationGate`: generation routes hold the `WeightsGate` shared for their whole response, answer 503
  (with the reason) while the weights are torn, and tag every response with the weights version that
  produced it in `X-Layercast-Weights-Version` (`initial` before the first sync).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from fastapi.exception_handlers import http_exception_handler
from starlette.requests import Request

from rpc.server.auth import AuthFailure, check_bearer
from rpc.server.weights_gate import WeightsGate

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Every route of `rpc.server.routes.build_router` with `dependencies=admin`
# (tests/test_admin_guard.py checks).
ADMIN_PATHS: tuple[str, ...] = ("/init_broadcaster", "/update_weights", "/check")
MAX_ADMIN_BODY_BYTES = 64 * 1024  # real bodies are < 4 KiB (the largest part is the quant scheme)
VERSION_HEADER = "X-Layercast-Weights-Version"

# Routes whose output depends on the weights (vLLM 0.26's generation and pooling routes).
GENERATION_PATHS: tuple[str, ...] = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/batch",
    "/v1/responses",
    "/v1/messages",
    "/generate",
    "/inference/v1/generate",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/embeddings",
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
)


async def answer_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    length = (b"content-length", str(len(payload)).encode())
    start = [(b"content-type", b"application/json"), length, *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": payload})


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


async def _refuse(scope: Scope, send: Send, failure: AuthFailure) -> None:
    """Answer `failure` as the app answers the route dependency's HTTPException (vLLM renders its own
    error shape; plain FastAPI `{"detail": ...}`), closing the connection: the body is never read."""
    exc = HTTPException(failure.status_code, detail=failure.detail, headers=failure.headers or None)
    handlers = getattr(scope.get("app"), "exception_handlers", None) or {}
    handler = next((handlers[c] for c in HTTPException.__mro__ if c in handlers), http_exception_handler)
    request = Request(scope, _no_body)
    try:
        raise exc  # the handler may log the exception it is handling (vLLM's --log-error-stack)
    except HTTPException:
        try:
            response = await handler(request, exc)
        except Exception:
            response = await http_exception_handler(request, exc)
    response.headers["connection"] = "close"
    await response(scope, _no_body, send)


class AdminGuard:
    """`token`: the server's admin token (None: the admin routes are open, the body is still capped)."""

    def __init__(self, app: ASGIApp, token: str | None = None, max_bytes: int = MAX_ADMIN_BODY_BYTES) -> None:
        self.app = app
        self.token = token
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ADMIN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = dict(reversed(scope.get("headers") or []))  # the first of a repeated header, as Starlette
        authorization = headers.get(b"authorization")
        failure = check_bearer(authorization.decode("latin-1") if authorization else None, self.token)
        if failure is not None:
            await _refuse(scope, send, failure)
            return
        too_big = {
            "error": "PayloadTooLarge",
            "detail": f"request body exceeds {self.max_bytes} bytes (the limit for {scope['path']})",
        }
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await answer_json(send, 413, too_big, [(b"connection", b"close")])
            return
        # Buffer (at most the limit) so chunked bodies without a length are bounded too, then replay.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await answer_json(send, 413, too_big, [(b"connection", b"close")])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class GenerationGate:
    """`status()` returns the backend's `WeightsStatus`, or None while the engine is not up."""

    def __init__(self, app: ASGIApp, gate: WeightsGate, status: Callable[[], Any]) -> None:
        self.app = app
        self.gate = gate
        self.status = status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        async with self.gate.generation():
            status = self.status()
            if status is None:
                await self.app(scope, receive, send)
                return
            if status.state == "torn":
                reason = status.last_error or "a sync failed after loading began"
                detail = f"weights are torn: {reason}; generation resumes when a complete sync lands"
                await answer_json(send, 503, {"error": "ModelTorn", "detail": detail}, [])
                return
            version = "initial" if status.weights_version is None else str(status.weights_version)
            tag = (VERSION_HEADER.lower().encode(), version.encode())

            async def tagged(message: Message) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), tag]}
                await send(message)

            await self.app(scope, receive, tagged)
