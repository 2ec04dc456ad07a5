"""Calls into the server's workers (`EngineClient.collective_rpc`) that can never deliver a late answer.

vLLM's multiprocess executor answers calls from one queue per worker, in order: when an executor-level
timeout abandons a call, its late answer is read by the NEXT call (a stale result handed to the wrong
request). So every layercast call here:
- passes no executor timeout (the worker's own deadlines bound its work: every wait in
  `sync_worker` has one), and waits on the API side with a bound of its own, shielded, so the call's
  answer is always consumed by the call itself, even after the HTTP request gave up on it;
- carries a fresh `call_id` that the worker echoes; an answer with another id means the queues are out
  of step, and the server reports itself unhealthy instead of serving wrong answers;
- is refused (503, naming the call) while an earlier call is still running past its bound: the engine
  is then blocked in that call, which `/health` reports too;
- fails at once (502) when the engine core dies while it waits: vLLM never resolves a `collective_rpc`
  that was in flight when its engine core died, so the wait watches `EngineClient.errored` instead of
  holding the request (and the API server's shutdown, which waits for open requests) to its bound.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from inference_worker.worker_results import WorkerResult
from rpc.errors import ApiError, SyncError

R = TypeVar("R", bound=WorkerResult)

# Added to a call's own deadline before the API side stops waiting for it (RPC round trips, the worker
# noticing a lost peer through the store: see broadcaster.group's bounded store operations).
RPC_GRACE_S = 30.0
# How often a waiting call looks whether the engine core has died.
ENGINE_WATCH_S = 0.25


class WorkersBusy(ApiError):
    """The engine is still inside an earlier layercast call that overran its deadline."""

    status_code = 503


class WorkerRpc:
    """Tagged, bounded `collective_rpc` for one engine client; see the module docstring."""

    def __init__(self, engine_client: Any) -> None:
        self._engine = engine_client
        self._overrun: str | None = None
        self._broken: str | None = None

    def health_problem(self) -> str | None:
        """Why the server cannot serve layercast calls now (None when it can)."""
        if self._broken is not None:
            return self._broken
        if self._overrun is not None:
            return self._overrun
        errored = getattr(self._engine, "errored", False)
        if errored:
            return "the engine core is dead (vLLM reports it errored)"
        return None

    async def call(self, method: str, deadline_s: float, result: type[R], **kwargs: Any) -> list[R]:
        """Run `method` on every worker; answers one `result` per worker (each echoing `call_id`).

        Raises `WorkersBusy` (503) when an earlier call still runs or this one overruns
        `deadline_s + RPC_GRACE_S`, `SyncError` (502) when the engine itself fails or answers out of
        step."""
        problem = self.health_problem()
        if problem is not None:
            raise WorkersBusy(f"{method} not started: {problem}")
        call_id = uuid.uuid4().hex[:16]
        started = time.monotonic()
        task = asyncio.ensure_future(
            self._engine.collective_rpc(method, timeout=None, kwargs={**kwargs, "call_id": call_id})
        )
        bound = deadline_s + RPC_GRACE_S
        while not task.done():
            left = started + bound - time.monotonic()
            if left <= 0:
                self._overrun = (
                    f"the workers are still inside {method} (call {call_id}), {bound:.0f} s after it "
                    f"started (its deadline was {deadline_s:.0f} s); the engine runs nothing else until it "
                    "returns"
                )
                task.add_done_callback(lambda _t: self._overrun_ended(call_id))
                raise WorkersBusy(self._overrun)
            await asyncio.wait({task}, timeout=min(left, ENGINE_WATCH_S))
            if not task.done() and getattr(self._engine, "errored", False):
                task.cancel()
                raise SyncError(
                    f"{method}: the engine core died {time.monotonic() - started:.1f} s into the call; "
                    "restart this server"
                )
        try:
            results = list(task.result())
        except Exception as exc:  # the engine failed (dead engine core, dead worker)
            dead = " (the engine core is dead)" if getattr(self._engine, "errored", False) else ""
            raise SyncError(
                f"{method}: the engine failed after {time.monotonic() - started:.1f} s{dead}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        try:
            answers = [result.model_validate(r) for r in results]
        except ValidationError as exc:
            raise SyncError(f"{method}: a worker answered something unreadable: {exc}", 500) from exc
        stale = [a.call_id for a in answers if a.call_id != call_id]
        if stale:
            self._broken = (
                f"worker answers out of step: {method} (call {call_id}) received answers of calls {stale}; "
                "restart this server"
            )
            raise SyncError(self._broken, status_code=500)
        return answers

    def _overrun_ended(self, call_id: str) -> None:
        if self._overrun is not None and call_id in self._overrun:
            self._overrun = None


def tagged(method: Callable[..., WorkerResult]) -> Callable[..., dict[str, Any]]:
    """Worker side: accept the caller's `call_id`; answer the method's result, with that id, as the
    JSON-mode dict `collective_rpc` can carry."""

    @functools.wraps(method)
    def run(self: Any, *args: Any, call_id: str = "", **kwargs: Any) -> dict[str, Any]:
        return {**method(self, *args, **kwargs).model_dump(mode="json"), "call_id": call_id}

    return run
