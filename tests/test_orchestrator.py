"""`SyncOrchestrator` against a real `layercast serve` (vLLM CPU build) over real HTTP and Gloo.

One server per module (vLLM start-up costs ~40 s on CPU); tests run in file order and share it. The
trainer sends with `WeightBroadcaster.push(..., arm=False)`; the orchestrator arms, waits and verifies.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

from rpc.client.orchestrator import PauseUnavailable, StepFailed, SyncOrchestrator
from rpc.tools.launch import ServerProcess, free_port
from tests.toy_server import assert_serves
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.toy_models import perturb_

pytestmark = pytest.mark.slow
TOKEN = "orchestrator-test-token"
BC_INIT = True


@pytest.fixture
def orch(server: ServerProcess) -> SyncOrchestrator:
    return SyncOrchestrator([server.url], token=TOKEN, timeout_s=60)


def _weights(url: str) -> dict:
    return httpx.get(url + "/weights").json()


def _wait_not_syncing(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _weights(url)["state"] == "syncing":
        assert time.monotonic() < deadline, "server still syncing"
        time.sleep(0.2)


def test_sync_steps_update_version_and_generation(
    server: ServerProcess, bc: WeightBroadcaster, orch: SyncOrchestrator, trainer_model: torch.nn.Module
) -> None:
    for version in (1, 2):
        perturb_(trainer_model, version)
        sid = f"step-{version}"
        report = orch.sync_step(
            lambda v=version, s=sid: bc.push(trainer_model, v, sync_id=s, arm=False), sid, version
        )
        r = report.servers[server.url]
        assert r.ok and r.action == "armed" and r.error is None
        assert r.response is not None and r.response.weights_version == version
        assert r.status is not None and r.status.last_sync_id == sid
        assert report.trainer_result.sync_id == sid and report.trainer_result.servers == {}
        assert report.total_s >= report.trainer_s > 0 and r.wall_s > 0
        assert sid in report.summary()
        assert _weights(server.url)["weights_version"] == version
        assert_serves(server.url, trainer_model)


def test_retry_with_same_sync_id_is_not_reapplied(
    server: ServerProcess, orch: SyncOrchestrator, trainer_model: torch.nn.Module
) -> None:
    before = _weights(server.url)
    assert before["last_sync_id"] == "step-2"

    def must_not_send() -> None:
        raise AssertionError("the trainer was asked to send a sync every server already has")

    report = orch.sync_step(must_not_send, "step-2", 2)
    assert report.already_applied and report.servers[server.url].action == "skipped"
    assert report.servers[server.url].ok
    assert _weights(server.url)["last_timings"] == before["last_timings"]  # nothing ran again
    assert_serves(server.url, trainer_model)


def test_running_receive_is_followed_not_reentered(
    server: ServerProcess, bc: WeightBroadcaster, orch: SyncOrchestrator, trainer_model: torch.nn.Module
) -> None:
    perturb_(trainer_model, 3)

    async def run() -> None:
        first = await orch.arm("step-3", 3)
        deadline = time.monotonic() + 30
        while (await orch.statuses())[server.url].state != "syncing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        retry = await SyncOrchestrator([server.url], token=TOKEN, timeout_s=60).arm("step-3", 3)
        assert retry.results[server.url].action == "joined"  # no second POST, so no 409
        push = asyncio.to_thread(bc.push, trainer_model, 3, sync_id="step-3", arm=False)
        a, b, _ = await asyncio.gather(first.wait(), retry.wait(), push)
        assert a[server.url].ok and a[server.url].response is not None
        assert b[server.url].ok and b[server.url].response is None
        assert b[server.url].status is not None and b[server.url].status.weights_version == 3

    asyncio.run(run())
    assert_serves(server.url, trainer_model)


def test_unreachable_server_is_named_and_nothing_is_armed(server: ServerProcess) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    orch = SyncOrchestrator([server.url, dead], token=TOKEN, timeout_s=10, http_timeout_s=3)
    with pytest.raises(StepFailed) as info:
        orch.sync_step(lambda: pytest.fail("must not send"), "step-x", 9)
    assert dead in str(info.value) and set(info.value.failures) == {dead}
    assert "unreachable" in info.value.failures[dead]
    assert _weights(server.url)["state"] == "ready" and _weights(server.url)["weights_version"] == 3


def test_pause_needs_dev_mode(server: ServerProcess, orch: SyncOrchestrator) -> None:
    with pytest.raises(PauseUnavailable) as info:
        orch.sync_step(lambda: pytest.fail("must not send"), "step-p", 9, pause="wait")
    assert server.url in str(info.value) and "VLLM_SERVER_DEV_MODE=1" in str(info.value)
    assert _weights(server.url)["state"] == "ready" and _weights(server.url)["weights_version"] == 3


def test_server_timeout_is_named(server: ServerProcess) -> None:
    orch = SyncOrchestrator([server.url], token=TOKEN, timeout_s=2)
    with pytest.raises(StepFailed) as info:
        orch.sync_step(lambda: None, "step-lonely", 4)  # the "trainer" never sends
    why = info.value.failures[server.url]
    assert "504" in why and "header" in why and server.url in str(info.value)
    assert _weights(server.url)["weights_version"] == 3


def test_client_deadline_is_named(server: ServerProcess, bc: WeightBroadcaster) -> None:
    bc.init()  # the server timeout above aborted the group: without one the server fails at once
    orch = SyncOrchestrator([server.url], token=TOKEN, timeout_s=3)

    async def run() -> None:
        handle = await orch.arm("step-slow", 4)
        await handle.wait(timeout_s=0.5)

    with pytest.raises(StepFailed, match=r"timed out after 0\.5 s") as info:
        asyncio.run(run())
    assert set(info.value.failures) == {server.url}
    _wait_not_syncing(server.url)  # the server's own 3 s timeout ends its receive


def test_recovers_after_failures(
    server: ServerProcess, bc: WeightBroadcaster, orch: SyncOrchestrator, trainer_model: torch.nn.Module
) -> None:
    bc.init()  # the timeouts aborted the group; re-join before arming (an armed server is busy)
    perturb_(trainer_model, 4)
    report = orch.sync_step(lambda: bc.push(trainer_model, 4, sync_id="step-4", arm=False), "step-4", 4)
    assert report.servers[server.url].ok and _weights(server.url)["weights_version"] == 4
    assert_serves(server.url, trainer_model)
