"""Fault suite, real processes dying: a trainer killed mid-sync, an inference worker killed mid-sync, an
inference server restarted between syncs.

Two `layercast serve` replicas (vLLM CPU build, one worker each) over real HTTP and Gloo. Every case
asserts: a clear error naming the cause within its deadline, no process left wedged, every surviving
server either on its previous complete weights or refusing generation (503 + reason), then a normal sync
succeeding without restarting the surviving processes. The trainers that run as separate processes log
at DEBUG; neither their output nor the servers' logs may contain the admin token.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from configs.trainer import BroadcasterConfig
from configs.wire import SyncHeader
from rpc.server.middleware import VERSION_HEADER
from rpc.tools.launch import ServerProcess, free_port, tiny_model_serve_args
from tests.conftest import ENGINE_ENV
from tests.toy_server import BackgroundPost, assert_serves
from trainer_side.broadcast import PushError, PushReport, WeightBroadcaster
from trainer_side.bucket_writer import BucketWriter
from trainer_side.toy_models import save_toy, toy_config, toy_model

pytestmark = pytest.mark.slow
TOKEN = "process-faults-token-51c8e2"
STEP_TIMEOUT_S = 20.0
BUCKET_BYTES = 16 * 1024  # ~1.7 MB of weights in ~100 buckets: plenty of mid-sync moments
PAUSE_AT = 12  # of the 25 tensors: about half the buckets are on the wire (and loading) when it stops


def model_at(version: int) -> torch.nn.Module:
    """The trainer's weights at `version` (0 = the checkpoint the servers start from)."""
    return toy_model(toy_config("qwen3", torch.float32), seed=version)


# ------------------------------------------------------------------ a trainer as its own process


class PausingBroadcaster(WeightBroadcaster):
    """A `WeightBroadcaster` whose stream can stop after `pause_at` tensors (buckets before it are on the
    wire and loading on the servers): it sets `mid` and waits for `go` (a kill, or a release). Either
    producer pauses: the walker's stream before that tensor, the in-place bucket writer (the default
    for this unsharded model) before the bucket where that tensor starts."""

    pause_at: int | None = None

    def __init__(self, config: BroadcasterConfig) -> None:
        super().__init__(config)
        self.mid = threading.Event()
        self.go = threading.Event()

    def _timed_stream(
        self, model: Any, report: PushReport, kernel: bool
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for i, item in enumerate(super()._timed_stream(model, report, kernel)):
            if i == self.pause_at:
                self.mid.set()
                self.go.wait(120)
            yield item

    def _plan_writer(self, model: Any, header: SyncHeader) -> BucketWriter | str:
        writer = super()._plan_writer(model, header)
        if isinstance(writer, BucketWriter):
            fill = writer.fill

            def pausing_fill(k: int, buf: torch.Tensor) -> None:
                if self.pause_at is not None and k == header.entries[self.pause_at].pieces[0].bucket:
                    self.mid.set()
                    self.go.wait(120)
                fill(k, buf)

            writer.fill = pausing_fill  # type: ignore[method-assign]
        return writer


def trainer_main() -> None:
    """Entry point of a trainer process: `python -c '...trainer_main()' JSON` (see `TrainerProcess`)."""
    args = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, force=True)
    bc = PausingBroadcaster(BroadcasterConfig(**args["config"]))
    if args["pause"]:
        bc.pause_at = PAUSE_AT
        threading.Thread(target=lambda: (bc.mid.wait(), print("MID-SYNC", flush=True)), daemon=True).start()
    bc.init()
    print("JOINED", flush=True)
    report = bc.push(model_at(args["version"]), args["version"], sync_id=args["sync_id"], arm=args["arm"])
    print("PUSHED", report.summary(), flush=True)


class TrainerProcess:
    """A trainer in its own process; its stdout lines arrive on a queue, its stderr goes to a file."""

    def __init__(
        self, work: Path, config: dict[str, Any], version: int, sync_id: str, *, pause: bool, arm: bool
    ):
        self.stderr_path = work / f"trainer-{sync_id}.stderr"
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        args = json.dumps(
            {"config": config, "version": version, "sync_id": sync_id, "pause": pause, "arm": arm}
        )
        code = "from tests.test_faults_processes import trainer_main; trainer_main()"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, args], stdout=subprocess.PIPE, stderr=err, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            self._lines.put(line.strip())

    def expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    break
                continue
            if line.startswith(prefix):
                return line
        raise AssertionError(f"trainer never printed {prefix!r}; stderr tail:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return "".join(self.stdout_lines) + self.stderr_path.read_text(errors="replace")


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults_processes")
    save_toy(model_at(0), path / "model")
    return path


def serve(work: Path, name: str, port: int | None = None) -> ServerProcess:
    """Start (without waiting) one replica of the checkpoint under `work/model`; log in `work/<name>.log`."""
    return ServerProcess(
        work / "model",
        port=port,
        extra_args=tiny_model_serve_args(),
        log_path=work / f"{name}.log",
        token=TOKEN,
        env=ENGINE_ENV,
    )


def ready(*servers: ServerProcess) -> None:
    for s in servers:
        try:
            s.wait_ready(300)
        except BaseException:
            for t in servers:
                t.stop()
            raise


@pytest.fixture(scope="module")
def servers(work: Path) -> Iterator[dict[str, ServerProcess]]:
    procs = {"a": serve(work, "a"), "b": serve(work, "b")}  # start together: ~40 s, not 80
    ready(*procs.values())
    yield procs  # tests replace restarted replicas in this dict
    for p in procs.values():
        p.stop()


def broadcaster_config(servers: dict[str, ServerProcess], work: Path) -> dict[str, Any]:
    return {
        "servers": [servers["a"].url, servers["b"].url],
        "inference_config": str(work / "model"),
        "master_port": free_port(),
        "token": TOKEN,
        "bucket_bytes": BUCKET_BYTES,
        "step_timeout_s": STEP_TIMEOUT_S,
        "rendezvous_timeout_s": 60,
        "sync_timeout_s": 120,
    }


def status(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(server.url + "/weights").json()


def wait_state(server: ServerProcess, state: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while status(server)["state"] != state:
        assert time.monotonic() < deadline, f"{server.url} never reached {state}: {status(server)}"
        time.sleep(0.05)


def completion(server: ServerProcess) -> httpx.Response:
    body = {"model": "toy", "prompt": [5, 17, 42], "max_tokens": 2, "temperature": 0.0}
    return httpx.post(server.url + "/v1/completions", json=body, timeout=60)


def assert_refuses_as_torn(server: ServerProcess, *causes: str) -> None:
    """`torn`, and generation refused with 503 naming the cause (any one of `causes`)."""
    s = status(server)
    assert s["state"] == "torn" and any(c in s["last_error"] for c in causes), s
    r = completion(server)
    assert r.status_code == 503 and "torn" in r.text and any(c in r.text for c in causes), r.text


def assert_on_version(server: ServerProcess, version: int) -> None:
    s = status(server)
    assert s["state"] == "ready" and s["weights_version"] == version, s
    assert completion(server).headers[VERSION_HEADER] == str(version)
    assert_serves(server.url, model_at(version))


def arm_and_wait(*servers: ServerProcess, sync_id: str, version: int) -> list[BackgroundPost]:
    """Arm `/update_weights` on every server (as an orchestrator does) and wait until each shows the
    sync waiting for its trainer in `/weights`."""
    body = {"sync_id": sync_id, "weights_version": version, "timeout_s": 60}
    armed = [BackgroundPost(s.url + "/update_weights", body, TOKEN) for s in servers]
    for s in servers:
        deadline = time.monotonic() + 10
        while status(s)["armed_sync_id"] != sync_id:
            assert time.monotonic() < deadline, status(s)
            time.sleep(0.02)
    return armed


def process_tree(server: ServerProcess) -> list[psutil.Process]:
    root = psutil.Process(server.proc.pid)
    return [root, *root.children(recursive=True)]


# ------------------------------------------------------------------ tests


def test_trainer_killed_mid_sync(servers: dict[str, ServerProcess], work: Path) -> None:
    a, b = servers["a"], servers["b"]
    config = broadcaster_config(servers, work)
    trainer = TrainerProcess(work, config, 1, "doomed-1", pause=True, arm=False)
    trainer.expect("JOINED", 120)
    armed = [BackgroundPost(s.url + "/update_weights", {"sync_id": "doomed-1", "weights_version": 1}, TOKEN)
             for s in (a, b)]  # fmt: skip
    trainer.expect("MID-SYNC", 60)  # half the tensors packed: their buckets sent and loading
    for s in (a, b):
        assert status(s)["state"] == "syncing"
    trainer.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for s, post in zip((a, b), armed, strict=True):
        answer = post.response(STEP_TIMEOUT_S + 30)
        assert answer.status_code == 502, answer.text
        assert "rank 0 gone?" in answer.text and "re-run /init_broadcaster" in answer.text, answer.text
        assert time.monotonic() - killed_at < STEP_TIMEOUT_S, "the server waited past its step deadline"
        assert_refuses_as_torn(s, "rank 0 gone?")
    assert trainer.proc.wait(10) == -signal.SIGKILL
    # A new trainer process (same servers, same server processes) syncs normally and heals both.
    config["master_port"] = free_port()
    healer = TrainerProcess(work, config, 2, "heal-2", pause=False, arm=True)
    healer.expect("PUSHED", 180)
    assert healer.proc.wait(30) == 0
    for s in (a, b):
        assert_on_version(s, 2)
    for t in (trainer, healer):
        out = t.output()
        assert "HTTP Request: POST" in out, "the trainer logged no requests: nothing was checked"
        assert TOKEN not in out


@pytest.fixture(scope="module")
def bc(servers: dict[str, ServerProcess], work: Path) -> Iterator[PausingBroadcaster]:
    b = PausingBroadcaster(BroadcasterConfig(**broadcaster_config(servers, work)))
    yield b
    b.close()


def test_inference_worker_killed_mid_sync(
    servers: dict[str, ServerProcess], bc: PausingBroadcaster, work: Path
) -> None:
    a, b = servers["a"], servers["b"]
    bc.init()
    bc.push(model_at(3), 3)
    victim_tree = process_tree(a)
    workers = [p for p in victim_tree if p.name() == "VLLM::Worker"]
    assert len(workers) == 1, [p.name() for p in victim_tree]
    bc.pause_at = PAUSE_AT
    bc.mid.clear()
    bc.go.clear()
    errors: list[BaseException] = []
    push = threading.Thread(target=lambda: _record(errors, lambda: bc.push(model_at(4), 4)), daemon=True)
    push.start()
    assert bc.mid.wait(60)
    for s in (a, b):
        assert status(s)["state"] == "syncing"
    workers[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    bc.go.set()
    push.join(STEP_TIMEOUT_S + 60)
    assert not push.is_alive(), "the trainer's push hung after a worker died"
    took = time.monotonic() - killed_at
    assert len(errors) == 1 and isinstance(errors[0], PushError), errors
    message = str(errors[0])
    assert "sync v4" in message or "sync " in message
    assert a.url in errors[0].server_errors and b.url in errors[0].server_errors, message
    assert took < STEP_TIMEOUT_S + 10, took
    # The replica whose worker died shuts down entirely (vLLM ends the API server when its engine dies).
    gone = psutil.wait_procs(victim_tree, timeout=60)[1]
    assert not gone, f"processes of the killed replica still running: {gone}"
    # The other replica had loaded part of sync 4: it refuses to generate, naming the cause.
    # (the trainer's abort notice, or Gloo's own report of the lost link if it came first)
    assert_refuses_as_torn(b, "aborted by rank 0 (trainer)", "Connection closed by peer")
    assert all(p.is_running() for p in process_tree(b))
    # Restart the dead replica on its port; the trainer's next push re-joins everyone and heals both.
    servers["a"] = restarted = serve(work, "a-restarted", port=a.port)
    ready(restarted)
    bc.pause_at = None
    bc.push(model_at(5), 5)
    for s in (restarted, b):
        assert_on_version(s, 5)


def _record(errors: list[BaseException], fn: Any) -> None:
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


def test_inference_server_restarted_between_syncs(
    servers: dict[str, ServerProcess], bc: PausingBroadcaster, work: Path
) -> None:
    a, b = servers["a"], servers["b"]
    group = bc.group
    assert group is not None and group.broken is None
    b.stop()  # graceful restart between syncs: nothing tells the trainer's group
    servers["b"] = restarted = serve(work, "b-restarted", port=b.port)
    ready(restarted)
    assert status(restarted)["state"] == "uninitialized"
    assert completion(restarted).headers[VERSION_HEADER] == "initial"
    t0 = time.monotonic()
    report = bc.push(model_at(6), 6)  # no explicit init: the trainer sees the restart and re-joins
    assert bc.group is not group and time.monotonic() - t0 < 60
    assert set(report.servers) == {a.url, restarted.url}
    for s in (a, restarted):
        assert_on_version(s, 6)


def test_frozen_trainer_never_wedges_a_server(servers: dict[str, ServerProcess], work: Path) -> None:
    """SIGSTOP the trainer mid-stream (its store freezes too): every server answers within its step
    deadline, stays healthy and answers later calls with their own answers; a new trainer heals it,
    also while the old one runs again (SIGCONT) with its dead group."""
    a, b = servers["a"], servers["b"]
    config = broadcaster_config(servers, work) | {"takeover": True}  # the `bc` fixture's group is live
    trainer = TrainerProcess(work, config, 7, "frozen-7", pause=True, arm=False)
    trainer.expect("JOINED", 120)
    body = {"sync_id": "frozen-7", "weights_version": 7, "timeout_s": STEP_TIMEOUT_S}
    armed = [BackgroundPost(s.url + "/update_weights", body, TOKEN) for s in (a, b)]
    trainer.expect("MID-SYNC", 60)
    trainer.proc.send_signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        for s, post in zip((a, b), armed, strict=True):
            answer = post.response(STEP_TIMEOUT_S + 40)
            assert answer.status_code in (502, 504), answer.text
            assert time.monotonic() - frozen_at < STEP_TIMEOUT_S + 5, "a server waited past its step deadline"
            assert_refuses_as_torn(s, "frozen-7", "rank 0")
            assert httpx.get(s.url + "/health").status_code == 200
            # The next worker call gets its own answer (not the dead sync's).
            check = httpx.post(s.url + "/check", json={}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert check.status_code == 200 and check.json()["state"] == "torn", check.text
    finally:
        trainer.proc.send_signal(signal.SIGCONT)
    config["master_port"] = free_port()
    healer = TrainerProcess(work, config, 8, "heal-8", pause=False, arm=True)
    healer.expect("PUSHED", 180)
    assert healer.proc.wait(30) == 0
    assert "frozen-7" not in healer.output()
    for s in (a, b):
        assert_on_version(s, 8)
    trainer.proc.kill()
    trainer.proc.wait(10)


def test_an_armed_sync_never_blocks_generation(
    servers: dict[str, ServerProcess], bc: PausingBroadcaster
) -> None:
    a, b = servers["a"], servers["b"]
    bc.pause_at = None
    bc.init()  # the servers are in the (exited) healer's group
    served = {s.url: str(status(s)["weights_version"]) for s in (a, b)}
    armed = arm_and_wait(a, b, sync_id="armed-9", version=9)
    for s in (a, b):
        for _ in range(3):  # armed, no trainer yet: generation goes on at its own pace
            t0 = time.monotonic()
            r = completion(s)
            assert r.status_code == 200 and r.headers[VERSION_HEADER] == served[s.url], r.text
            assert time.monotonic() - t0 < 5, "generation waited for the armed sync"
    bc.push(model_at(9), 9, sync_id="armed-9", arm=False)
    for s, post in zip((a, b), armed, strict=True):
        assert post.response(30).status_code == 200
        assert_on_version(s, 9)


def _poisoned(version: int) -> torch.nn.Module:
    model = model_at(version)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.model.norm.weight[0] = float("inf")
    return model


def test_nonfinite_weights_never_reach_a_server(
    servers: dict[str, ServerProcess], bc: PausingBroadcaster
) -> None:
    a, b = servers["a"], servers["b"]
    before = {s.url: status(s) for s in (a, b)}
    t0 = time.monotonic()
    with pytest.raises(PushError, match="non-finite") as info:
        bc.push(_poisoned(10), 10)
    assert "model.layers.1.mlp.down_proj.weight" in str(info.value) and "model.norm.weight" in str(info.value)
    assert time.monotonic() - t0 < 10
    for s in (a, b):
        assert status(s) == before[s.url]  # never armed, nothing loaded
    # Armed by an orchestrator: the trainer cancels the sync and the servers answer at once.
    armed = arm_and_wait(a, b, sync_id="nan-10", version=10)
    t0 = time.monotonic()
    with pytest.raises(PushError, match="non-finite"):
        bc.push(_poisoned(10), 10, sync_id="nan-10", arm=False)
    for s, post in zip((a, b), armed, strict=True):
        answer = post.response(10)
        assert answer.status_code == 409 and "cancelled" in answer.text and "non-finite" in answer.text
        assert_on_version(s, 9)
    assert time.monotonic() - t0 < 10


def test_a_second_trainer_is_refused_then_takes_over_only_explicitly(
    servers: dict[str, ServerProcess], bc: PausingBroadcaster, work: Path
) -> None:
    a, b = servers["a"], servers["b"]
    bc.push(model_at(11), 11)  # the first trainer's group is live
    second = WeightBroadcaster(BroadcasterConfig(**broadcaster_config(servers, work)))
    with pytest.raises(PushError, match="live broadcast group of trainer") as info:
        second.init()
    assert bc.trainer_id in str(info.value) and "takeover" in str(info.value)
    bc.push(model_at(12), 12)  # untouched by the refused attempt
    for s in (a, b):
        assert_on_version(s, 12)
    taker = WeightBroadcaster(BroadcasterConfig(**broadcaster_config(servers, work), takeover=True))
    taker.push(model_at(13), 13)
    for s in (a, b):
        assert_on_version(s, 13)
    t0 = time.monotonic()
    with pytest.raises(PushError, match="took the servers over") as info:
        bc.push(model_at(14), 14)  # the first trainer's next call fails at once, naming the takeover
    assert taker.trainer_id in str(info.value) and time.monotonic() - t0 < 5
    taker.close()


def test_dead_engine_core_is_named_within_the_step_deadline(
    servers: dict[str, ServerProcess], work: Path
) -> None:
    a, b = servers["a"], servers["b"]
    trainer = PausingBroadcaster(BroadcasterConfig(**broadcaster_config(servers, work), takeover=True))
    trainer.push(model_at(15), 15)
    core = [p for p in process_tree(a) if p.name() == "VLLM::EngineCore"]
    assert len(core) == 1, [p.name() for p in process_tree(a)]
    trainer.pause_at = PAUSE_AT
    errors: list[BaseException] = []
    push = threading.Thread(
        target=lambda: _record(errors, lambda: trainer.push(model_at(16), 16)), daemon=True
    )
    push.start()
    assert trainer.mid.wait(60)
    core[0].kill()
    killed_at = time.monotonic()
    trainer.go.set()
    push.join(STEP_TIMEOUT_S + 60)
    assert not push.is_alive(), "the trainer's push hung after an engine core died"
    took = time.monotonic() - killed_at
    assert len(errors) == 1 and isinstance(errors[0], PushError), errors
    assert took < STEP_TIMEOUT_S + 15, took
    why = errors[0].server_errors.get(a.url, "")
    assert why.strip() and a.url in str(errors[0]), str(errors[0])
    trainer.close()
    # vLLM ends the API server when its engine core dies, once no request is open: the sync that was
    # in flight must not hold it (it answered 502 at once instead of waiting out its deadline).
    a.proc.wait(timeout=30)
    assert time.monotonic() - killed_at < STEP_TIMEOUT_S + 20
    a.stop()
    servers["a"] = restarted = serve(work, "a-restarted-core", port=a.port)
    ready(restarted)
    healer = PausingBroadcaster(BroadcasterConfig(**broadcaster_config(servers, work), takeover=True))
    healer.push(model_at(17), 17)
    for s in (restarted, b):
        assert_on_version(s, 17)
    healer.close()


def every_rank_worker(rank: int, port: int, urls: list[str], work: str, version: int) -> None:
    """One rank of a 2-rank FSDP2 trainer (Gloo) with `senders="every_rank"`: it pushes `version` to
    `urls[rank]` alone, in its own `ipc` group; an unreachable URL must fail this rank only."""
    from torch.distributed.device_mesh import init_device_mesh

    from tests.test_walker_fsdp import join_gloo, leave_gloo, shard

    join_gloo(rank, port, 2)
    try:
        model = shard(model_at(version), init_device_mesh("cpu", (2,)))
        config = BroadcasterConfig(
            servers=[urls[rank]], inference_config=str(Path(work) / "model"), master_port=free_port(),
            token=TOKEN, bucket_bytes=BUCKET_BYTES, step_timeout_s=STEP_TIMEOUT_S, rendezvous_timeout_s=60,
            http_timeout_s=5, backend="ipc", senders="every_rank", takeover=True,
        )  # fmt: skip
        bc = WeightBroadcaster(config)
        if urls[rank].endswith(":1"):
            with pytest.raises(PushError, match="cannot reach"):
                bc.push(model, version)
        else:
            report = bc.push(model, version)
            assert report.servers[urls[rank]].weights_version == version, report.servers
        bc.close()
    finally:
        leave_gloo()


def test_every_fsdp_rank_writes_its_own_server(servers: dict[str, ServerProcess], work: Path) -> None:
    """`senders="every_rank"`: each rank of an FSDP2 trainer syncs the server beside it (here over `/dev/shm`)
    after the per-layer gather; nothing is broadcast between trainer ranks. A rank whose server cannot be
    reached fails alone and the other rank's sync still lands (the gathers stay in lockstep)."""
    import torch.multiprocessing as mp

    a, b = servers["a"], servers["b"]
    mp.spawn(every_rank_worker, args=(free_port(), [a.url, b.url], str(work), 30), nprocs=2, join=True)
    for s in (a, b):
        assert_on_version(s, 30)
    mp.spawn(every_rank_worker, args=(free_port(), [a.url, "http://127.0.0.1:1"], str(work), 31), nprocs=2)
    assert_on_version(a, 31)
    assert_on_version(b, 30)


def test_the_token_never_appears_in_any_server_log(servers: dict[str, ServerProcess], work: Path) -> None:
    logs = sorted(work.glob("*.log"))
    assert len(logs) == 5, logs  # a, b, and the three restarted replicas
    for log in logs:
        text = log.read_text(errors="replace")
        assert "POST /update_weights" in text, f"{log.name}: no admin request logged, nothing checked"
        assert TOKEN not in text, log.name
