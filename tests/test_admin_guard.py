"""The admin routes' guard, in process (no engine): auth before any body byte is read, the body cap on
every admin route, strict request fields, and the sync guard (same sync id / older version: 409 unless
`force`).

The app is `rpc.server.routes.build_router` over a fake backend behind
`rpc.server.middleware.AdminGuard`, as the vLLM plugin installs them; `BodyMeter` (outermost) counts the
body bytes anything inside asked for.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    SyncTimings,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)
from configs.check import CheckRequest, CheckResponse
from rpc.client.http_client import AsyncServerClient
from rpc.client.orchestrator import SyncOrchestrator
from rpc.server import sync_guard
from rpc.server.middleware import ADMIN_PATHS, MAX_ADMIN_BODY_BYTES, AdminGuard
from rpc.server.routes import build_router

TOKEN = "guard-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODIES: dict[str, dict[str, Any]] = {
    "/init_broadcaster": {
        "master_address": "127.0.0.1",
        "master_port": 29500,
        "world_size": 2,
        "rank_offset": 1,
    },
    "/update_weights": {"sync_id": "s1", "weights_version": 1},
    "/check": {"load_path": "auto"},
}


class FakeBackend:
    """Records every call; a sync always lands."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._status = WeightsStatus(state="ready", weights_version=None, scheme=None, load_path=None)

    def status(self) -> WeightsStatus:
        return self._status

    def health_problem(self) -> str | None:
        return None

    async def init_broadcaster(self, req: InitBroadcasterRequest) -> InitBroadcasterResponse:
        self.calls.append(("init", req))
        return InitBroadcasterResponse(
            ranks=[1], load_path="checkpoint", load_path_reason="fake", tensor_parallel_size=1
        )

    async def wait_for_trainer(self, req: UpdateWeightsRequest) -> float:
        return 5.0

    async def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        self.calls.append(("update", req))
        self._status = self._status.model_copy(
            update={"weights_version": req.weights_version, "last_sync_id": req.sync_id, "last_error": None}
        )
        return UpdateWeightsResponse(
            sync_id=req.sync_id,
            weights_version=req.weights_version,
            load_path="checkpoint",
            bytes_received=1,
            num_tensors=1,
            timings=SyncTimings(),
        )

    async def check(self, req: CheckRequest) -> CheckResponse:
        self.calls.append(("check", req))
        return CheckResponse(
            load_path="checkpoint",
            load_path_reason="fake",
            num_workers=1,
            state="ready",
            weights_version=None,
            runtime_manifest=[],
        )


class BodyMeter:
    """Outermost ASGI wrapper: how many body bytes the app (guard included) pulled from the client."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bytes_read = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            self.bytes_read += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def make_app(
    token: str | None = TOKEN, guard: bool = True, configure: Callable[[FastAPI], None] | None = None
) -> tuple[FastAPI, FakeBackend]:
    backend = FakeBackend()
    app = FastAPI()
    if configure is not None:
        configure(app)
    app.include_router(build_router(lambda: backend, token, get_checker=lambda: backend))
    if guard:
        app.add_middleware(AdminGuard, token=token)
    return app, backend


@pytest.fixture
def served() -> Iterator[tuple[TestClient, BodyMeter, FakeBackend]]:
    app, backend = make_app()
    meter = BodyMeter(app)
    with TestClient(meter) as client:
        yield client, meter, backend


def test_admin_paths_are_exactly_the_routes_with_the_bearer_dependency() -> None:
    router = build_router(lambda: FakeBackend(), TOKEN, get_checker=lambda: FakeBackend())
    guarded = {r.path for r in router.routes if isinstance(r, APIRoute) and r.dependencies}
    assert guarded == set(ADMIN_PATHS) == set(BODIES)


@pytest.mark.parametrize("path", list(BODIES))
def test_unauthenticated_requests_are_refused_before_the_body_is_read(
    served: tuple[TestClient, BodyMeter, FakeBackend], path: str
) -> None:
    client, meter, backend = served
    huge = b'{"x": "' + b"a" * (8 * MAX_ADMIN_BODY_BYTES) + b'"}'
    for headers, status, text in (
        ({}, 401, "missing bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "missing bearer token"),
        ({"Authorization": "Bearer not-the-token"}, 403, "wrong bearer token"),
    ):
        for content in (huge, b"{}"):
            r = client.post(path, content=content, headers={**headers, "content-type": "application/json"})
            assert r.status_code == status and text in r.json()["detail"], r.text
            assert TOKEN not in r.text and "not-the-token" not in r.text
            assert r.headers["connection"] == "close"
    assert meter.bytes_read == 0, "the guard read a body it had not authenticated"
    assert backend.calls == []


@pytest.mark.parametrize("path", list(BODIES))
def test_guard_answers_exactly_as_the_route_dependency(path: str) -> None:
    """Same status, JSON and WWW-Authenticate as `bearer_auth` alone (no middleware) gives."""
    guarded = TestClient(make_app()[0])
    dependency_only = TestClient(make_app(guard=False)[0])
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        a = guarded.post(path, json=BODIES[path], headers=headers)
        b = dependency_only.post(path, json=BODIES[path], headers=headers)
        assert (a.status_code, a.json()) == (b.status_code, b.json())
        assert a.headers.get("www-authenticate") == b.headers.get("www-authenticate")


def test_vllm_error_shapes_are_kept() -> None:
    """Under vLLM's own exception handlers (its error JSON), the guard's 401/403 are the dependency's,
    and a strict-field error is vLLM's 400 naming the field."""
    server_utils = pytest.importorskip("vllm.entrypoints.serve.utils.server_utils")
    from fastapi import HTTPException
    from fastapi.exceptions import RequestValidationError

    def vllm_handlers(app: FastAPI) -> None:
        app.state.args = Namespace(log_error_stack=False)
        app.exception_handler(HTTPException)(server_utils.http_exception_handler)
        app.exception_handler(RequestValidationError)(server_utils.validation_exception_handler)

    guarded = TestClient(make_app(configure=vllm_handlers)[0])
    dependency_only = TestClient(make_app(guard=False, configure=vllm_handlers)[0])
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        a = guarded.post("/check", json=BODIES["/check"], headers=headers)
        b = dependency_only.post("/check", json=BODIES["/check"], headers=headers)
        assert a.status_code == b.status_code == status
        assert a.json() == b.json() and a.json()["error"]["code"] == status, a.text
    r = guarded.post("/update_weights", json={"sync_id": "s", "weights_version": "7"}, headers=AUTH)
    assert r.status_code == 400 and "weights_version" in r.text, r.text


@pytest.mark.parametrize("path", list(BODIES))
def test_oversized_bodies_are_413_on_every_admin_route(
    served: tuple[TestClient, BodyMeter, FakeBackend], path: str
) -> None:
    client, meter, backend = served
    declared = b'{"x": "' + b"a" * (103 << 20) + b'"}'  # the 103 MiB body of the report
    r = client.post(path, content=declared, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and str(MAX_ADMIN_BODY_BYTES) in r.text and path in r.text, r.text
    assert meter.bytes_read == 0  # refused on its content-length

    def streamed() -> Iterator[bytes]:  # no content-length: the cap applies to what is read
        yield b'{"x": "'
        for _ in range(64):
            yield b"y" * 4096
        yield b'"}'

    r = client.post(path, content=streamed(), headers=AUTH)
    assert r.status_code == 413 and str(MAX_ADMIN_BODY_BYTES) in r.text, r.text
    assert backend.calls == []


def test_without_a_token_admin_routes_are_open_but_capped() -> None:
    app, backend = make_app(token=None)
    client = TestClient(app)
    assert client.post("/check", json=BODIES["/check"]).status_code == 200
    big = b'{"x": "' + b"a" * MAX_ADMIN_BODY_BYTES + b'"}'
    assert client.post("/check", content=big, headers={"content-type": "application/json"}).status_code == 413
    assert [c[0] for c in backend.calls] == ["check"]


def test_authenticated_requests_reach_the_routes(served: tuple[TestClient, BodyMeter, FakeBackend]) -> None:
    client, _, backend = served
    for path, body in BODIES.items():
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 200, r.text
    assert [c[0] for c in backend.calls] == ["init", "update", "check"]
    assert client.get("/weights").json()["weights_version"] == 1  # no auth on /weights


# --------------------------------------------------------------------------- strict fields


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/update_weights", {"sync_id": "s", "weights_version": True}, "weights_version"),
        ("/update_weights", {"sync_id": "s", "weights_version": "7"}, "weights_version"),
        ("/update_weights", {"sync_id": "s", "weights_version": 7.0}, "weights_version"),
        ("/update_weights", {"sync_id": "s", "weights_version": 7, "timeout_s": "20"}, "timeout_s"),
        ("/update_weights", {"sync_id": "s", "weights_version": 7, "force": "yes"}, "force"),
        ("/update_weights", {"sync_id": 7, "weights_version": 7}, "sync_id"),
        ("/init_broadcaster", {**BODIES["/init_broadcaster"], "master_port": "29500"}, "master_port"),
        ("/init_broadcaster", {**BODIES["/init_broadcaster"], "world_size": True}, "world_size"),
        ("/init_broadcaster", {**BODIES["/init_broadcaster"], "checksum": 1}, "checksum"),
        ("/check", {"checkpoint_manifest": [["w", "bfloat16", ["7", 2]]]}, "checkpoint_manifest"),
    ],
)
def test_coerced_types_are_refused_naming_the_field(
    served: tuple[TestClient, BodyMeter, FakeBackend], path: str, body: dict[str, Any], field: str
) -> None:
    client, _, backend = served
    r = client.post(path, json=body, headers=AUTH)
    assert r.status_code in (400, 422) and field in r.text, r.text
    assert backend.calls == []


def test_ints_for_floats_and_json_lists_for_tuples_still_pass(
    served: tuple[TestClient, BodyMeter, FakeBackend],
) -> None:
    client, _, backend = served
    init = {**BODIES["/init_broadcaster"], "rendezvous_timeout_s": 20, "step_timeout_s": 30}
    init["scheme"] = {"kind": "fp8_block", "block_size": [128, 128], "ignore": ["lm_head"]}
    assert client.post("/init_broadcaster", json=init, headers=AUTH).status_code == 200
    body = {"sync_id": "s", "weights_version": 7, "timeout_s": 20}
    assert client.post("/update_weights", json=body, headers=AUTH).status_code == 200
    check = {"checkpoint_manifest": [["w", "bfloat16", [7, 2]]], "kernel_manifest": [["w", "bfloat16", []]]}
    assert client.post("/check", json=check, headers=AUTH).status_code == 200
    got = backend.calls[0][1]
    assert got.rendezvous_timeout_s == 20.0 and got.scheme.block_size == (128, 128)
    # The worker re-validates the JSON-mode dump it gets through collective_rpc (sync_worker.layercast_init).
    assert InitBroadcasterRequest.model_validate(got.model_dump(mode="json")) == got
    assert backend.calls[1][1].timeout_s == 20.0


# --------------------------------------------------------------------------- sync guard


def _update(client: TestClient, sync_id: str, version: int, **extra: Any) -> httpx.Response:
    return client.post(
        "/update_weights", json={"sync_id": sync_id, "weights_version": version, **extra}, headers=AUTH
    )


def test_same_sync_id_twice_is_409_naming_it_unless_forced(
    served: tuple[TestClient, BodyMeter, FakeBackend],
) -> None:
    client, _, backend = served
    assert _update(client, "step-3", 3).status_code == 200
    for version in (3, 4):  # the same weights again, or other weights under the same id
        r = _update(client, "step-3", version)
        assert r.status_code == 409 and "'step-3' already landed" in r.json()["detail"], r.text
    assert len(backend.calls) == 1
    assert _update(client, "step-3", 4, force=True).status_code == 200
    assert backend.calls[-1][1].force is True and len(backend.calls) == 2


def test_version_going_backwards_is_409_naming_both_unless_forced(
    served: tuple[TestClient, BodyMeter, FakeBackend],
) -> None:
    client, _, backend = served
    assert _update(client, "step-5", 5).status_code == 200
    r = _update(client, "step-4", 4)
    assert r.status_code == 409, r.text
    assert "weights_version 4 is older than the weights_version 5" in r.json()["detail"]
    assert _update(client, "step-5b", 5).status_code == 200  # the same version under a new id is fine
    assert _update(client, "step-4", 4, force=True).status_code == 200
    assert client.get("/weights").json()["weights_version"] == 4
    assert [c[1].sync_id for c in backend.calls] == ["step-5", "step-5b", "step-4"]


def test_a_sync_that_did_not_land_can_be_retried_under_its_id() -> None:
    req = UpdateWeightsRequest(sync_id="s", weights_version=2)

    def status(**kw: Any) -> WeightsStatus:
        base = {
            "state": "ready",
            "weights_version": 1,
            "scheme": None,
            "load_path": None,
            "last_sync_id": "s",
        }
        return WeightsStatus(**(base | kw))

    assert sync_guard.refusal(status(state="torn"), req) is None
    assert sync_guard.refusal(status(last_error="refused: wrong header"), req) is None
    assert sync_guard.refusal(status(), req) is not None  # landed
    assert sync_guard.refusal(status(weights_version=None, last_sync_id=None), req) is None  # fresh server

    def not_up() -> WeightsStatus:
        from rpc.errors import NotReady

        raise NotReady("the engine is not up yet")

    assert sync_guard.check(not_up, req) is None  # the sync itself answers 503


def test_the_client_and_orchestrator_send_force(
    served: tuple[TestClient, BodyMeter, FakeBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, meter, backend = served
    url = "http://guarded"

    def asgi_client(self: SyncOrchestrator, base: str) -> AsyncServerClient:
        c = AsyncServerClient(base, self.token)
        c._http = httpx.AsyncClient(transport=httpx.ASGITransport(meter), base_url=base, headers=AUTH)
        return c

    async def direct() -> None:
        c = asgi_client(SyncOrchestrator([url], TOKEN), url)
        async with c:
            await c.update_weights(UpdateWeightsRequest(sync_id="d", weights_version=9, timeout_s=20))

    asyncio.run(direct())  # the trainer's JSON-mode body passes the strict model
    monkeypatch.setattr(SyncOrchestrator, "_client", asgi_client)
    orch = SyncOrchestrator([url], TOKEN, timeout_s=20)
    again = orch.sync_step(lambda: pytest.fail("must not send"), "d", 9)
    assert again.already_applied and len(backend.calls) == 1
    report = orch.sync_step(lambda: None, "d", 8, force=True)
    assert report.servers[url].ok and report.servers[url].action == "armed"
    assert backend.calls[-1][1].force is True and backend.calls[-1][1].weights_version == 8
