"""`WorkerRpc`: a call's answer is never handed to a later call, and a call that overruns is reported.

vLLM's engine cannot be made to hang a worker on demand, so the engine client here is a stand-in with
vLLM's `collective_rpc` signature whose answers arrive when the test says (the real engine is exercised
by the fault suites: `test_faults_processes::test_frozen_trainer_never_wedges_a_server`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inference_worker import worker_rpc
from inference_worker.worker_results import PollResult, WorkerResult
from inference_worker.worker_rpc import WorkerRpc, WorkersBusy, tagged
from rpc.errors import SyncError


class _Engine:
    """Answers each call with `{"ok": True, "call_id": ...}` once `release` is set for it."""

    errored = False

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []
        self.answer_with: str | None = None  # answer another call's id (queues out of step)

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ) -> list[Any]:
        assert timeout is None, "an executor timeout would leave a late answer for the next call"
        call_id = (kwargs or {})["call_id"]
        self.calls.append(method)
        gate = self.release.setdefault(method, asyncio.Event())
        await gate.wait()
        return [{"ok": True, "call_id": self.answer_with or call_id, "announced": method == "layercast_poll"}]


def test_an_overrunning_call_is_reported_and_its_late_answer_stays_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_rpc, "RPC_GRACE_S", 0.05)

    async def run() -> None:
        engine = _Engine()
        rpc = WorkerRpc(engine)
        with pytest.raises(WorkersBusy, match="still inside layercast_receive"):
            await rpc.call("layercast_receive", 0.05, PollResult)
        assert "layercast_receive" in (rpc.health_problem() or "")
        with pytest.raises(WorkersBusy, match="layercast_check not started"):
            await rpc.call("layercast_check", 1.0, PollResult)
        assert engine.calls == ["layercast_receive"]  # the refused call never reached the engine
        engine.release["layercast_receive"].set()  # the late answer arrives: consumed by its own call
        for _ in range(100):
            if rpc.health_problem() is None:
                break
            await asyncio.sleep(0.01)
        assert rpc.health_problem() is None
        engine.release.setdefault("layercast_check", asyncio.Event()).set()
        results = await rpc.call("layercast_check", 1.0, PollResult)
        assert results == [PollResult(ok=True, call_id=results[0].call_id)] and results[0].call_id
        assert engine.calls == ["layercast_receive", "layercast_check"]

    asyncio.run(run())


def test_a_call_in_flight_when_the_engine_core_dies_fails_at_once() -> None:
    # vLLM never answers a collective_rpc that was in flight when its engine core died.
    async def run() -> None:
        engine = _Engine()
        rpc = WorkerRpc(engine)
        call = asyncio.ensure_future(rpc.call("layercast_receive", 600.0, PollResult))
        await asyncio.sleep(0.3)
        assert not call.done()
        engine.errored = True
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(SyncError, match="engine core died"):
            await call
        assert asyncio.get_running_loop().time() - t0 < 2 * worker_rpc.ENGINE_WATCH_S + 0.1
        with pytest.raises(WorkersBusy, match="engine core is dead"):
            await rpc.call("layercast_poll", 1.0, PollResult)

    asyncio.run(run())


def test_an_answer_of_another_call_marks_the_server_broken() -> None:
    async def run() -> None:
        engine = _Engine()
        engine.answer_with = "someone-else"
        engine.release["layercast_poll"] = asyncio.Event()
        engine.release["layercast_poll"].set()
        rpc = WorkerRpc(engine)
        with pytest.raises(SyncError, match="out of step"):
            await rpc.call("layercast_poll", 1.0, PollResult)
        assert "out of step" in (rpc.health_problem() or "")
        with pytest.raises(WorkersBusy):
            await rpc.call("layercast_poll", 1.0, PollResult)

    asyncio.run(run())


def test_the_worker_side_echoes_the_call_id() -> None:
    class Worker:
        @tagged
        def layercast_x(self, announced: bool) -> WorkerResult:
            return PollResult(ok=True, announced=announced)

    answer = Worker().layercast_x(True, call_id="abc")
    assert PollResult.model_validate(answer) == PollResult(ok=True, announced=True, call_id="abc")
    assert Worker().layercast_x(False)["call_id"] == ""  # an untagged caller (tests, vLLM's dev route)
