"""`SyncOrchestrator`: the RL loop's one call per step that makes every inference server take a sync.

It arms `/update_weights` on all servers concurrently, lets the trainer send (`WeightBroadcaster.push(...,
arm=False)`), waits for every server's answer under one deadline, and then checks that every server reports
the new version and sync id in `GET /weights`. Failures are collected, never first-wins: the error names
every server that failed or timed out, with its reason.

Retries are idempotent by sync id: a server whose `/weights` already shows `last_sync_id == sync_id` at
that version is not armed again, and a server that is still receiving (state `syncing`, or a 409 "in
progress") is never re-entered: the orchestrator follows it through `/weights` until it finishes. Since the
trainer's broadcast reaches the whole group, a retry where only some servers already applied the sync is
refused with a clear error (use a new sync id). Optional pause/resume around the swap uses vLLM's dev routes
(`POST /pause?mode=...`, `POST /resume`), which exist only when the server runs with
`VLLM_SERVER_DEV_MODE=1`; a 404 there is reported as such.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from configs.api import UpdateWeightsRequest, UpdateWeightsResponse, WeightsStatus
from configs.settings import OrchestratorSettings
from rpc.client.http_client import AsyncServerClient, ServerError, tls_context

PauseMode = Literal["abort", "wait", "keep"]
Action = Literal["armed", "joined", "skipped"]
DEV_MODE_HINT = "start the server with VLLM_SERVER_DEV_MODE=1 (vLLM's dev routes /pause and /resume)"
_POLL_S = 0.2


class StepFailed(RuntimeError):
    """A sync did not land everywhere; `failures` maps every failing server URL to its reason."""

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


class PauseUnavailable(StepFailed):
    """`/pause` or `/resume` is missing (404): the server does not run vLLM's dev routes."""


class PartialRetry(StepFailed):
    """A retry where some servers already applied this sync id and others did not (the broadcast
    reaches the whole group, so the servers that are done would not listen): use a new sync id."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ServerError):
        return f"HTTP {exc.status_code}: {exc.detail}"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPError):
        return f"unreachable ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def _failure_message(what: str, failures: dict[str, str]) -> str:
    lines = "\n".join(f"  - {url}: {why}" for url, why in failures.items())
    return f"{what} on {len(failures)} server(s):\n{lines}"


def applied(status: WeightsStatus, sync_id: str, version: int) -> bool:
    """Whether a server's `/weights` shows this exact sync landed (and nothing failed after it)."""
    return (
        status.state == "ready"
        and status.last_sync_id == sync_id
        and status.weights_version == version
        and status.last_error is None
    )


@dataclass
class ServerResult:
    """One server's part in one sync. `wall_s` is from arming to its answer, as seen by the orchestrator."""

    url: str
    action: Action
    ok: bool = False
    error: str | None = None
    response: UpdateWeightsResponse | None = None
    status: WeightsStatus | None = None
    wall_s: float = 0.0


@dataclass
class SyncStepReport:
    """What `sync_step` did: per-server results and timings, and the trainer's own return value."""

    sync_id: str
    weights_version: int
    servers: dict[str, ServerResult] = field(default_factory=dict)
    already_applied: bool = False
    trainer_result: Any = None
    arm_s: float = 0.0
    trainer_s: float = 0.0
    wait_s: float = 0.0
    total_s: float = 0.0

    def summary(self) -> str:
        if self.already_applied:
            return f"sync {self.sync_id} v{self.weights_version}: already applied on every server, skipped"
        per = ", ".join(
            f"{u} {r.action} {r.wall_s * 1e3:.0f} ms"
            + (f" (load {r.response.timings.load_s * 1e3:.0f} ms)" if r.response else "")
            for u, r in self.servers.items()
        )
        return (
            f"sync {self.sync_id} v{self.weights_version}: {self.total_s * 1e3:.0f} ms "
            f"(arm {self.arm_s * 1e3:.0f}, trainer {self.trainer_s * 1e3:.0f}, "
            f"wait {self.wait_s * 1e3:.0f} ms); {per}"
        )


class SyncHandle:
    """One armed sync; `await wait()` once. Owns its HTTP clients (they live in the arming event loop)."""

    def __init__(
        self,
        orch: SyncOrchestrator,
        sync_id: str,
        version: int,
        clients: dict[str, AsyncServerClient],
        results: dict[str, ServerResult],
        tasks: dict[str, asyncio.Task[ServerResult]],
        paused: list[str],
        started: float,
    ) -> None:
        self.orch = orch
        self.sync_id = sync_id
        self.version = version
        self.results = results
        self._clients = clients
        self._tasks = tasks
        self._paused = paused
        self._started = started
        self._waited = False

    @property
    def already_applied(self) -> bool:
        """Every server already had this sync: the trainer must not send."""
        return all(r.action == "skipped" for r in self.results.values())

    async def wait(self, timeout_s: float | None = None) -> dict[str, ServerResult]:
        """Wait (at most `timeout_s` seconds from now; default the orchestrator's timeout plus slack) for
        every server, resume paused ones, verify `/weights` everywhere; raise `StepFailed` naming every
        server that failed or timed out."""
        if self._waited:
            raise RuntimeError("SyncHandle.wait() was already called")
        self._waited = True
        timeout = timeout_s if timeout_s is not None else self.orch.timeout_s + self.orch.grace_s
        try:
            if self._tasks:
                _, pending = await asyncio.wait(self._tasks.values(), timeout=timeout)
                for url, task in self._tasks.items():
                    if task in pending:
                        task.cancel()
                        r = self.results[url]
                        r.error = (
                            f"timed out after {timeout:.1f} s waiting for sync {self.sync_id} "
                            f"({r.action}; the server may still be receiving)"
                        )
                        r.wall_s = time.perf_counter() - self._started
                if pending:
                    await asyncio.wait(pending)
            await self._verify()
        finally:
            resume_errors = await self.orch._resume(self._paused)
            await asyncio.gather(*(c.aclose() for c in self._clients.values()))
        failures = {u: r.error for u, r in self.results.items() if r.error}
        for url, why in resume_errors.items():
            failures[url] = f"{failures[url]}; and {why}" if url in failures else why
        if failures:
            raise StepFailed(
                _failure_message(f"sync {self.sync_id} (version {self.version}) failed", failures), failures
            )
        return self.results

    async def _verify(self) -> None:
        async def one(url: str) -> None:
            r = self.results[url]
            try:
                r.status = await self._clients[url].weights()
            except Exception as exc:
                r.error = r.error or f"GET /weights after the sync: {_describe(exc)}"
                return
            if r.error:
                return
            if applied(r.status, self.sync_id, self.version):
                r.ok = True
            else:
                s = r.status
                last_error = f", last_error={s.last_error}" if s.last_error else ""
                r.error = (
                    f"answered but /weights shows state={s.state}, version={s.weights_version}, "
                    f"last_sync_id={s.last_sync_id}{last_error}"
                )

        await asyncio.gather(*(one(u) for u in self.results))


class SyncOrchestrator:
    """Drives the inference servers' side of each sync; the trainer sends with `push(..., arm=False)`.

    `timeout_s` bounds one sync on each server (sent as the request's `timeout_s`); waiting adds `grace_s`
    for the HTTP answer. `http_timeout_s` bounds the short calls (`/weights`, `/pause`, `/resume`).
    """

    def __init__(
        self,
        servers: list[str],
        token: str | None = None,
        timeout_s: float = 600.0,
        *,
        http_timeout_s: float = 30.0,
        grace_s: float = 30.0,
    ) -> None:
        if not servers:
            raise ValueError("SyncOrchestrator needs at least one server URL")
        if len(set(servers)) != len(servers):
            raise ValueError(f"duplicate server URLs: {servers}")
        self.servers = [s.rstrip("/") for s in servers]
        self.token = token
        self.timeout_s = timeout_s
        self.http_timeout_s = http_timeout_s
        self.grace_s = grace_s

    @classmethod
    def from_settings(cls, settings: OrchestratorSettings) -> SyncOrchestrator:
        """The orchestrator of `[orchestrator]` settings (`configs.settings.OrchestratorSettings`)."""
        token = settings.token.get_secret_value() if settings.token else None
        return cls(settings.servers, token, settings.timeout_s, http_timeout_s=settings.http_timeout_s)

    def _client(self, url: str) -> AsyncServerClient:
        return AsyncServerClient(url, self.token, self.http_timeout_s)

    # ------------------------------------------------------------------ statuses

    async def statuses(self) -> dict[str, WeightsStatus]:
        """`GET /weights` on every server; raises `StepFailed` naming every server that did not answer."""
        clients = {u: self._client(u) for u in self.servers}
        try:
            return await self._statuses(clients)
        finally:
            await asyncio.gather(*(c.aclose() for c in clients.values()))

    async def _statuses(self, clients: dict[str, AsyncServerClient]) -> dict[str, WeightsStatus]:
        got = await asyncio.gather(*(c.weights() for c in clients.values()), return_exceptions=True)
        failures = {
            u: f"GET /weights: {_describe(g)}"
            for u, g in zip(clients, got, strict=True)
            if isinstance(g, BaseException)
        }
        if failures:
            raise StepFailed(_failure_message("cannot read the weights status", failures), failures)
        return dict(zip(clients, got, strict=True))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ pause / resume

    async def _post_dev(self, urls: list[str], path: str) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        async def one(url: str) -> str | None:
            try:
                client = httpx.AsyncClient(timeout=self.timeout_s, headers=headers, verify=tls_context())
                async with client as http:
                    resp = await http.post(url + path)
            except httpx.HTTPError as exc:
                return f"POST {path}: {_describe(exc)}"
            if resp.status_code == 404:
                return f"POST {path.split('?')[0]} is not there (404): {DEV_MODE_HINT}"
            if resp.status_code >= 400:
                return f"POST {path} answered {resp.status_code}: {resp.text[:300]}"
            return None

        errs = await asyncio.gather(*(one(u) for u in urls))
        return {u: e for u, e in zip(urls, errs, strict=True) if e}

    async def _pause(self, urls: list[str], mode: PauseMode) -> None:
        failures = await self._post_dev(urls, f"/pause?mode={mode}")
        if failures:
            await self._resume([u for u in urls if u not in failures])
            cls = PauseUnavailable if any("404" in f for f in failures.values()) else StepFailed
            raise cls(_failure_message("cannot pause generation (nothing was armed)", failures), failures)

    async def _resume(self, urls: list[str]) -> dict[str, str]:
        return await self._post_dev(urls, "/resume") if urls else {}

    # ------------------------------------------------------------------ arm

    async def arm(
        self, sync_id: str, version: int, *, pause: PauseMode | None = None, force: bool = False
    ) -> SyncHandle:
        """Start `/update_weights` on every server that needs it and return at once (the POSTs are in
        flight). Skips servers that already applied `sync_id` at `version`, follows servers that are still
        receiving, and raises before arming anything when a server is unreachable, the retry is partial,
        or `pause` was asked for and a server cannot pause. A server refuses (409) a sync id it already
        applied or a version older than its own, unless `force` (which also arms the servers that
        already applied it)."""
        req = UpdateWeightsRequest(
            sync_id=sync_id, weights_version=version, timeout_s=self.timeout_s, force=force
        )
        clients = {u: self._client(u) for u in self.servers}
        try:
            statuses = await self._statuses(clients)
            results: dict[str, ServerResult] = {}
            for url, s in statuses.items():
                action: Action = (
                    "skipped"
                    if applied(s, sync_id, version) and not force
                    else "joined"
                    if s.state == "syncing"
                    else "armed"
                )
                results[url] = ServerResult(url, action, status=s)
            done = [u for u, r in results.items() if r.action == "skipped"]
            if done and len(done) < len(results):
                failures = {
                    u: f"state={r.status.state}, version={r.status.weights_version}, "
                    f"last_sync_id={r.status.last_sync_id}"
                    for u, r in results.items()
                    if r.action != "skipped" and r.status is not None
                }
                raise PartialRetry(
                    f"sync {sync_id} (version {version}) already landed on {', '.join(done)} but not on the "
                    "others; the trainer's broadcast reaches every server of the group, so retry with a "
                    "new sync id.\n" + _failure_message("not applied", failures),
                    failures,
                )
            paused: list[str] = []
            if pause is not None and not done:
                await self._pause(list(results), pause)
                paused = list(results)
        except BaseException:
            await asyncio.gather(*(c.aclose() for c in clients.values()))
            raise
        started = time.perf_counter()
        tasks = {
            url: asyncio.create_task(self._drive(clients[url], results[url], req, started))
            for url, r in results.items()
            if r.action != "skipped"
        }
        await asyncio.sleep(0)  # let every POST get on its way before the caller starts sending
        return SyncHandle(self, sync_id, version, clients, results, tasks, paused, started)

    async def _drive(
        self, client: AsyncServerClient, r: ServerResult, req: UpdateWeightsRequest, started: float
    ) -> ServerResult:
        try:
            if r.action == "armed":
                try:
                    r.response = await client.update_weights(req, timeout_s=self.timeout_s + self.grace_s)
                except ServerError as exc:
                    if exc.status_code == 409 and "in progress" in exc.detail:
                        r.action = "joined"  # a receive is running: never re-enter it, follow it
                    elif exc.status_code in (400, 422) and "update_info" in exc.detail:
                        raise ServerError(
                            exc.url,
                            exc.status_code,
                            "vLLM's own dev-mode /update_weights route answered (VLLM_SERVER_DEV_MODE=1 "
                            f"shadows layercast's route): {exc.detail}",
                        ) from exc
                    else:
                        raise
            if r.action == "joined":
                while (await client.weights()).state == "syncing":
                    await asyncio.sleep(_POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            r.error = f"{r.action}: {_describe(exc)}"
        r.wall_s = time.perf_counter() - started
        return r

    # ------------------------------------------------------------------ one RL step

    def sync_step(
        self,
        trainer_push: Callable[[], Any],
        sync_id: str,
        version: int,
        *,
        pause: PauseMode | None = None,
        timeout_s: float | None = None,
        force: bool = False,
    ) -> SyncStepReport:
        """Arm every server, run `trainer_push()` in this thread (e.g. `lambda: broadcaster.push(model, v,
        sync_id=sid, arm=False)`), wait, verify; returns the report or raises `StepFailed`.

        The trainer's group must already be up (`WeightBroadcaster.init()`, again after a failed sync):
        a push that has to re-join would find the armed servers busy. When every server already applied
        `sync_id`, nothing is armed and `trainer_push` is not called (`report.already_applied`); `force`
        applies it again, and lets `version` go back (see `arm`)."""
        report = SyncStepReport(sync_id=sync_id, weights_version=version)
        t0 = time.perf_counter()
        armed = threading.Event()
        box: dict[str, Any] = {}

        async def drive() -> dict[str, ServerResult]:
            try:
                handle = await self.arm(sync_id, version, pause=pause, force=force)
            finally:
                armed.set()
            box["handle"] = handle
            box["armed_at"] = time.perf_counter()
            return await handle.wait(timeout_s)

        def run() -> None:
            try:
                box["results"] = asyncio.run(drive())
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=run, name=f"layercast-sync-{sync_id}", daemon=True)
        thread.start()
        armed.wait()
        handle: SyncHandle | None = box.get("handle")
        if handle is None:  # arming failed: nothing was started, the trainer must not send
            thread.join()
            raise box["error"]
        report.arm_s = box["armed_at"] - t0
        trainer_error: BaseException | None = None
        if handle.already_applied:
            report.already_applied = True
        else:
            t1 = time.perf_counter()
            try:
                report.trainer_result = trainer_push()
            except Exception as exc:
                trainer_error = exc
            report.trainer_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        thread.join()
        report.wait_s = time.perf_counter() - t2
        report.total_s = time.perf_counter() - t0
        report.servers = handle.results
        server_error: BaseException | None = box.get("error")
        if trainer_error is not None:
            failures = server_error.failures if isinstance(server_error, StepFailed) else {}
            detail = f"\n{server_error}" if server_error else ""
            raise StepFailed(
                f"sync {sync_id} (version {version}): the trainer's push failed: "
                f"{type(trainer_error).__name__}: {trainer_error}{detail}",
                failures,
            ) from trainer_error
        if server_error is not None:
            raise server_error
        return report
