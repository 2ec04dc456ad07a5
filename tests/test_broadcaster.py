"""The broadcaster end to end: real worker processes, real Gloo groups over real TCP, bit-exact checks;
the protocol scenarios run again on the colocated `ipc` backend (buckets through /dev/shm).

Four long-lived spawned workers play rank 0 (trainer) and ranks 1-3 (server A holds ranks 1-2, server B
rank 3); each scenario sends one function per rank and collects what it returned or raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import multiprocessing as mp
import os
import re
import signal
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from broadcaster.errors import BroadcastError, SyncFailed, SyncRefused
from broadcaster.framing import make_header
from broadcaster.group import Group
from broadcaster.receiver import RING, Receiver
from broadcaster.report import SyncReport
from broadcaster.sender import Sender
from broadcaster.timeouts import Timeouts
from configs.wire import SyncHeader

pytestmark = pytest.mark.slow

WORLD = 4
WHO = {0: "trainer", 1: "server A", 2: "server A", 3: "server B"}
BUCKET = 64 << 10
FAST = Timeouts(header_s=10.0, vote_s=10.0, bucket_s=10.0, commit_s=10.0)
Spec = tuple[str, torch.dtype, tuple[int, ...]]

# Mixed dtypes, odd sizes, an empty tensor, packed FP4 and e8m0 scales, and tensors larger than a bucket.
SPECS: list[Spec] = [
    *(
        (f"layers.{i}.{part}", dtype, shape)
        for i in range(6)
        for part, dtype, shape in (
            ("q.weight", torch.float8_e4m3fn, (96, 128)),
            ("q.weight_scale_inv", torch.float32, (1, 1)),
            ("norm.weight", torch.bfloat16, (97,)),
            ("odd", torch.uint8, (13, 3)),
            ("fp4", torch.float4_e2m1fn_x2, (17, 8)),
            ("e8m0", torch.float8_e8m0fnu, (5,)),
        )
    ),
    ("empty", torch.bfloat16, (0, 7)),
    ("embed.weight", torch.float32, (300, 257)),  # ~4.7 buckets
    ("lm_head.weight", torch.bfloat16, (211, 301)),  # sent non-contiguous, ~1.9 buckets
    ("tail", torch.float32, (3,)),
]


# ------------------------------------------------------------------ data


def payload(name: str, dtype: torch.dtype, shape: tuple[int, ...], version: int = 0) -> torch.Tensor:
    """Deterministic random bytes for `name` (any bit pattern, NaNs included), viewed as `dtype`."""
    n = torch.Size(shape).numel() * dtype.itemsize
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}@{version}".encode()))
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)


def produce(
    specs: list[Spec], version: int = 0, fail_at: int | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    for i, (name, dtype, shape) in enumerate(specs):
        if i == fail_at:
            raise RuntimeError("quantizer exploded")
        t = payload(name, dtype, shape, version)
        if name == "lm_head.weight":
            t = t.t().contiguous().t()  # same values, column-major strides
            assert not t.is_contiguous()
        yield name, t


def header(
    specs: list[Spec], sync_id: str, version: int = 0, checksum: bool = True, bucket: int = BUCKET
) -> SyncHeader:
    return make_header(specs, sync_id=sync_id, weights_version=version, bucket_size=bucket, checksum=checksum)


_BACKEND = ["gloo"]  # set per scenario by `on_backend` inside the worker


def on_backend(rank: int, scenario: Callable[..., Any], backend: str, **kwargs: Any) -> Any:
    """Run `scenario` with every group it forms on `backend`."""
    _BACKEND[0] = backend
    try:
        return scenario(rank=rank, **kwargs)
    finally:
        _BACKEND[0] = "gloo"


def group(rank: int, port: int, world: int = WORLD, generation: int = 0, timeout_s: float = 15.0) -> Group:
    return Group(
        "127.0.0.1",
        port,
        world,
        rank,
        backend=_BACKEND[0],  # type: ignore[arg-type]
        who=WHO.get(rank, f"rank {rank}"),
        timeout_s=timeout_s,
        generation=generation,
        op_timeout_s=60.0,
    )


def send(g: Group, specs: list[Spec], sync_id: str, version: int = 0, **kw: Any) -> SyncReport:
    return Sender(g, timeouts=FAST).send(header(specs, sync_id, version), produce(specs, version, **kw))


def receive(
    receiver: Receiver,
    specs: list[Spec],
    version: int = 0,
    check: Callable[[SyncHeader], str | None] | None = None,
    fail_on: str | None = None,
) -> SyncReport:
    """Receive one sync and compare every tensor byte for byte with what the sender produced."""
    dtypes = {name: (dtype, shape) for name, dtype, shape in specs}
    seen: list[str] = []
    with receiver.begin(check) as sync:
        for name, t in sync:
            dtype, shape = dtypes[name]
            assert (t.dtype, tuple(t.shape)) == (dtype, shape), name
            assert torch.equal(t.view(torch.uint8), payload(name, dtype, shape, version).view(torch.uint8)), (
                name
            )
            if name == fail_on:
                raise ValueError(f"cannot load {name}")
            seen.append(name)
        report = sync.finish()
    assert seen == [s[0] for s in specs]
    return report


def err(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e)


# ------------------------------------------------------------------ scenarios (run inside the workers)


def roundtrip(rank: int, port: int) -> list[SyncReport]:
    with group(rank, port) as g:
        if rank == 0:
            return [send(g, SPECS, "s1", 1), send(g, SPECS, "s2", 2)]
        r = Receiver(g, timeouts=FAST)
        return [receive(r, SPECS, 1), receive(r, SPECS, 2)]


def refusal_then_success(rank: int, port: int) -> tuple[tuple[str, str], SyncReport]:
    with group(rank, port) as g:
        if rank == 0:
            try:
                send(g, SPECS, "old", 1)
            except SyncRefused as e:
                refused = err(e)
            return refused, send(g, SPECS, "new", 2)
        r = Receiver(g, timeouts=FAST)

        def check(h: SyncHeader) -> str | None:
            return "weights_version 1 is older than loaded 5" if rank == 2 and h.weights_version < 2 else None

        try:
            receive(r, SPECS, 1, check)
        except SyncRefused as e:
            refused = err(e)
        return refused, receive(r, SPECS, 2, check)


def failures_then_success(rank: int, port: int) -> tuple[list[tuple[str, str]], SyncReport]:
    """Producer raises; producer mismatches the manifest; a consumer fails; then a clean sync."""
    wrong = [*SPECS[:3], (SPECS[3][0], torch.uint8, (13, 4)), *SPECS[4:]]
    out: list[tuple[str, str]] = []
    with group(rank, port) as g:
        r = None if rank == 0 else Receiver(g, timeouts=FAST)
        for i, (specs, fail_at) in enumerate([(SPECS, 9), (wrong, None), (SPECS, None)]):
            try:
                if rank == 0:
                    Sender(g, timeouts=FAST).send(header(SPECS, f"f{i}"), produce(specs, fail_at=fail_at))
                else:
                    assert r is not None
                    with r.begin() as sync:  # after a sender failure the rest of the stream is zeros
                        for name, _ in sync:
                            if rank == 3 and i == 2 and name == "tail":
                                raise ValueError(f"cannot load {name}")
            except (SyncFailed, ValueError) as e:  # rank 3's own consumer error propagates after the vote
                out.append(err(e))
        return out, (send(g, SPECS, "ok") if rank == 0 else receive(r, SPECS))  # type: ignore[arg-type]


def checksum_mismatch(rank: int, port: int) -> tuple[tuple[str, str], SyncReport]:
    with group(rank, port) as g:
        if rank == 0:
            try:
                send(g, SPECS, "c1")
            except SyncFailed as e:
                caught = err(e)
            return caught, send(g, SPECS, "c2")
        armed = [rank == 3]

        def corrupt_on_the_wire(bucket: int, data: torch.Tensor) -> None:
            if armed[0] and bucket == 1:
                data[100] ^= 0x10
                armed[0] = False

        r = Receiver(g, timeouts=FAST, bucket_hook=corrupt_on_the_wire)
        try:
            with r.begin() as sync:  # a consumer that trusts the wire: only the checksum can notice
                for _ in sync:
                    pass
        except SyncFailed as e:
            caught = err(e)
        return caught, receive(r, SPECS)


def rendezvous_wrong_world(rank: int, port: int) -> tuple[tuple[str, str], float]:
    start = time.monotonic()
    try:
        group(rank, port, world=3 if rank == 0 else 4, timeout_s=20.0)
    except BroadcastError as e:
        return err(e), time.monotonic() - start
    raise AssertionError("rendezvous accepted a world size mismatch")


def rendezvous_missing_rank(rank: int, port: int) -> tuple[tuple[str, str], float]:
    start = time.monotonic()
    try:
        group(rank, port, timeout_s=1.5)
    except BroadcastError as e:
        return err(e), time.monotonic() - start
    raise AssertionError("rendezvous succeeded without rank 3")


def sender_dies(rank: int, port: int) -> None:
    g = group(rank, port)

    def die_after_some() -> Iterator[tuple[str, torch.Tensor]]:
        for i, item in enumerate(produce(SPECS)):
            if i == 20:
                os.kill(os.getpid(), signal.SIGKILL)
            yield item

    Sender(g, timeouts=FAST).send(header(SPECS, "doomed"), die_after_some())


def sender_retry(rank: int, port: int) -> SyncReport:
    with group(rank, port, generation=1) as g:
        return send(g, SPECS, "retry")


def receivers_survive_dead_sender(
    rank: int, port: int, bucket_s: float
) -> tuple[tuple[str, str], float, SyncReport]:
    g = group(rank, port)
    start = time.monotonic()
    try:
        with Receiver(g, timeouts=Timeouts(bucket_s=bucket_s)).begin() as sync:
            for _ in sync:
                pass
        raise AssertionError("received a sync from a dead sender")
    except BroadcastError as e:
        caught, took = err(e), time.monotonic() - start
    g.close()
    with group(rank, port, generation=1) as g2:
        return caught, took, receive(Receiver(g2, timeouts=FAST), SPECS)


def sender_times_out_then_all_retry(rank: int, port: int) -> tuple[tuple[str, str], float, SyncReport]:
    """Rank 3 stalls before its commit: the sender's commit deadline fires; everyone re-forms and syncs."""
    g = group(rank, port)
    start = time.monotonic()
    try:
        if rank == 0:
            Sender(g, timeouts=Timeouts(commit_s=1.0)).send(header(SPECS, "stall"), produce(SPECS))
        else:
            with Receiver(g, timeouts=FAST).begin() as sync:
                for _ in sync:
                    pass
                if rank == 3:
                    time.sleep(2.0)
        raise AssertionError("the stalled sync succeeded")
    except BroadcastError as e:
        caught, took = err(e), time.monotonic() - start
    g.close()
    with group(rank, port, generation=1) as g2:
        return (
            caught,
            took,
            (send(g2, SPECS, "after") if rank == 0 else receive(Receiver(g2, timeouts=FAST), SPECS)),
        )


def _reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's peak-RSS mark; returns the current RSS in bytes."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") << 10


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bounded_memory(rank: int, port: int, bucket: int) -> tuple[int, SyncReport]:
    """A 96 MiB model of many tensors (one of 12 MiB) through 4 MiB buckets: peak RSS growth is measured."""
    specs: list[Spec] = [(f"w{i}", torch.bfloat16, (1024, 1000 + i)) for i in range(42)]
    specs.insert(20, ("big", torch.float32, (3 << 20,)))
    with group(rank, port, world=2) as g:
        small = [("warm", torch.float32, (4,))]
        h = make_header(specs, sync_id="mem", weights_version=0, bucket_size=bucket, checksum=True)
        # A warm-up sync, then the measured one twice: the smaller peak growth of the two is reported,
        # since where glibc puts a freed buffer's successor varies by a few MiB from run to run (a
        # buffer that is really kept shows in both).
        grew: list[int] = []
        if rank == 0:  # tensors are made lazily and dropped once packed
            Sender(g, timeouts=FAST).send(header(small, "warm"), produce(small))
            for _ in range(2):
                base = _reset_peak_rss()
                gen = ((n, torch.full(s, i % 7, dtype=d)) for i, (n, d, s) in enumerate(specs))
                report = Sender(g, timeouts=FAST).send(h, gen)
                grew.append((_status_kib("VmHWM") << 10) - base)
        else:
            receiver = Receiver(g, timeouts=FAST)
            receive(receiver, small)
            for _ in range(2):
                base = _reset_peak_rss()
                with receiver.begin() as sync:
                    for i, (name, t) in enumerate(sync):
                        assert name == specs[i][0] and bool((t == i % 7).all()), name
                    report = sync.finish()
                grew.append((_status_kib("VmHWM") << 10) - base)
        return min(grew), report


# ------------------------------------------------------------------ the worker pool


def _serve(conn: Connection, rank: int) -> None:
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        fn, kwargs = job
        try:
            conn.send(("ok", fn(rank=rank, **kwargs)))
        except BaseException as e:
            conn.send(("raised", err(e)))


class Cluster:
    def __init__(self, n: int) -> None:
        # Workers fork from a server that imported torch once: 4 cold `import torch` on 2 cores take ~13 s.
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(["torch", "broadcaster.sender", "broadcaster.receiver"])
        self.procs: list[Any] = [None] * n
        self.conns: list[Connection] = [None] * n  # type: ignore[list-item]
        # Quiet c10d's C++ warnings about the stores the failure scenarios kill on purpose; the fork
        # server (started by the first spawn) keeps this environment, pytest's own is restored.
        saved = os.environ.get("TORCH_CPP_LOG_LEVEL")
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
        try:
            for rank in range(n):
                self.spawn(rank)
        finally:
            if saved is None:
                del os.environ["TORCH_CPP_LOG_LEVEL"]
            else:
                os.environ["TORCH_CPP_LOG_LEVEL"] = saved

    def spawn(self, rank: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_serve, args=(child, rank), daemon=True)
        proc.start()
        child.close()
        self.procs[rank], self.conns[rank] = proc, parent

    def submit(self, rank: int, fn: Callable[..., Any], **kwargs: Any) -> None:
        self.conns[rank].send((fn, kwargs))

    def collect(self, rank: int, timeout_s: float = 30.0) -> Any:
        status, value = self._answer(rank, timeout_s)
        if status != "ok":
            raise AssertionError(f"rank {rank} raised {value[0]}: {value[1]}")
        return value

    def _answer(self, rank: int, timeout_s: float) -> tuple[str, Any]:
        if not self.conns[rank].poll(timeout_s):
            self.procs[rank].kill()  # a hung worker is useless to later tests
            self.spawn(rank)
            return "hung", f"no answer within {timeout_s} s"
        try:
            return self.conns[rank].recv()  # type: ignore[no-any-return]
        except EOFError:
            self.procs[rank].join(5)
            return "ok", ("died", self.procs[rank].exitcode)

    def run(
        self, fn: Callable[..., Any], ranks: range | list[int] = range(WORLD), **kwargs: Any
    ) -> list[Any]:
        """Run `fn` on `ranks`; every answer is read (so none is left for a later test) before judging."""
        for rank in ranks:
            self.submit(rank, fn, **kwargs)
        answers = [self._answer(rank, 30.0) for rank in ranks]
        for rank, (status, value) in zip(ranks, answers, strict=True):
            if status != "ok":
                raise AssertionError(f"rank {rank} {status}: {value}")
        return [value for _, value in answers]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self.procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(WORLD)
    yield c
    c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_stream_of_mixed_tensors_arrives_bit_exact(cluster: Cluster, backend: str) -> None:
    reports = cluster.run(
        on_backend, scenario=roundtrip, backend=backend, port=free_port()
    )  # receivers assert every byte themselves
    sent = reports[0][0]
    assert sent.buckets >= 8 and sent.tensors == len(SPECS) and sent.peak_buffer_bytes == 2 * BUCKET
    for rank_reports in reports[1:]:
        for rep in rank_reports:
            assert (rep.role, rep.payload_bytes, rep.buckets) == (
                "receiver",
                sent.payload_bytes,
                sent.buckets,
            )
            biggest = 300 * 257 * 4
            assert rep.peak_buffer_bytes == RING * BUCKET + biggest


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_one_refusal_refuses_everywhere_and_the_group_stays_usable(cluster: Cluster, backend: str) -> None:
    results = cluster.run(on_backend, scenario=refusal_then_success, backend=backend, port=free_port())
    for rank, (refused, report) in enumerate(results):
        assert refused[0] == "SyncRefused", rank
        assert "rank(s) [2]" in refused[1] and "weights_version 1 is older than loaded 5" in refused[1]
        assert report.tensors == len(SPECS)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_failures_mid_stream_are_voted_and_the_next_sync_works(cluster: Cluster, backend: str) -> None:
    results = cluster.run(on_backend, scenario=failures_then_success, backend=backend, port=free_port())
    for rank, (failures, report) in enumerate(results):
        kinds = [f[0] for f in failures]
        raised, mismatch, consumer = (f[1] for f in failures)
        assert kinds == ["SyncFailed", "SyncFailed", "ValueError" if rank == 3 else "SyncFailed"], failures
        assert "rank(s) [0]:" in raised and "producer raised RuntimeError: quantizer exploded" in raised
        assert (
            "rank(s) [0]:" in mismatch
            and "does not match the manifest" in mismatch
            and SPECS[3][0] in mismatch
        )
        assert "cannot load tail" in consumer and (rank == 3 or "rank(s) [3]:" in consumer)
        assert report.tensors == len(SPECS)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_a_corrupted_bucket_fails_the_commit_naming_rank_and_bucket(cluster: Cluster, backend: str) -> None:
    results = cluster.run(on_backend, scenario=checksum_mismatch, backend=backend, port=free_port())
    for caught, report in results:
        assert caught[0] == "SyncFailed"
        assert "rank(s) [3]: rank 3: checksum mismatch in bucket(s) [1] of 8" in caught[1], caught
        assert report.tensors == len(SPECS)


def test_world_size_mismatch_fails_fast_on_every_rank(cluster: Cluster) -> None:
    results = cluster.run(rendezvous_wrong_world, port=free_port())
    messages = {m for (_, m), _ in results}
    assert len(messages) == 1, messages  # every rank reports the same verdict
    (kind, message), _ = results[0]
    assert kind == "RendezvousError"
    assert "rank 0 (trainer) says world_size=3" in message
    # Names whichever inference ranks had joined when the disagreement was seen.
    assert re.search(
        r"ranks? \d \(server [AB]\).* says? world_size=4, rank 0 \(trainer\) says world_size=3", message
    )
    assert max(took for _, took in results) < 10.0


def test_missing_rank_hits_the_rendezvous_deadline_with_its_name(cluster: Cluster) -> None:
    results = cluster.run(rendezvous_missing_rank, ranks=[0, 1, 2], port=free_port())
    for (kind, message), took in results:
        assert kind == "RendezvousTimeout" and "for ranks [3] to join at 127.0.0.1:" in message
        assert "waited 1.5 s" in message and took < 8.0


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_killed_sender_fails_every_receiver_in_time_then_a_fresh_group_works(
    cluster: Cluster, backend: str
) -> None:
    port, bucket_s = free_port(), 5.0
    cluster.submit(0, on_backend, scenario=sender_dies, backend=backend, port=port)
    for rank in (1, 2, 3):
        cluster.submit(
            rank,
            on_backend,
            scenario=receivers_survive_dead_sender,
            backend=backend,
            port=port,
            bucket_s=bucket_s,
        )
    senders = {cluster.procs[0].pid}
    assert cluster.collect(0)[0] == "died"
    cluster.spawn(0)
    senders.add(cluster.procs[0].pid)
    cluster.submit(0, on_backend, scenario=sender_retry, backend=backend, port=port)
    sent = cluster.collect(0)
    for rank in (1, 2, 3):
        (kind, message), took, report = cluster.collect(rank)
        assert kind in ("PeerLost", "BroadcastTimeout") and f"rank {rank}" in message, message
        assert took < bucket_s + 2.0
        assert report.payload_bytes == sent.payload_bytes
    # the killed sender's /dev/shm files were unlinked (mapped by all) or swept by the next sender; only
    # the senders' own files are judged (other test processes may have live ones)
    left = [p for p in glob.glob("/dev/shm/layercast-*") if int(p.split("-")[1]) in senders]
    assert left == []


def rendezvous_backend_mismatch(rank: int, port: int) -> tuple[str, str]:
    try:
        on_backend(rank, group, "ipc" if rank == 0 else "gloo", port=port, timeout_s=20.0)
    except BroadcastError as e:
        return err(e)
    raise AssertionError("rendezvous accepted a backend mismatch")


def test_backend_disagreement_fails_the_rendezvous_naming_both(cluster: Cluster) -> None:
    results = cluster.run(rendezvous_backend_mismatch, port=free_port())
    for kind, message in results:
        assert kind == "RendezvousError" and "backend disagreement" in message, message
        assert "rank 0 (trainer) asked for ipc" in message and "asked for gloo" in message


def test_sender_deadline_aborts_everyone_and_the_same_processes_reform(cluster: Cluster) -> None:
    results = cluster.run(sender_times_out_then_all_retry, port=free_port())
    (kind, message), took, _ = results[0]
    assert kind == "BroadcastTimeout" and "rank 0 (trainer) waited 1.0 s for the commit vote" in message
    assert took < 5.0
    for rank, ((kind, message), _, report) in enumerate(results):
        assert kind in ("PeerLost", "BroadcastTimeout"), (rank, message)
        assert report.tensors == len(SPECS)


def test_memory_stays_bounded_by_a_few_buckets_plus_the_largest_oversized_tensor(cluster: Cluster) -> None:
    bucket = 4 << 20
    (grew0, sent), (grew1, got) = cluster.run(bounded_memory, ranks=[0, 1], port=free_port(), bucket=bucket)
    model = sent.payload_bytes
    big, largest_small = 12 << 20, 1024 * 1041 * 2
    assert model > 90 << 20
    assert sent.peak_buffer_bytes == 2 * bucket and got.peak_buffer_bytes == RING * bucket + big
    # Sender: buffers + the tensor being packed. Receiver: buffers + staging + the test's own compare mask.
    slack = 8 << 20
    assert grew0 < 2 * bucket + big + slack, grew0
    assert grew1 < RING * bucket + 2 * big + slack, grew1
    assert max(grew0, grew1) < model / 2
    print(
        f"\n96 MiB over Gloo, {bucket >> 20} MiB buckets: sender {sent.gbytes_per_s:.2f} GB/s "
        f"(rss +{grew0 >> 20} MiB), receiver {got.gbytes_per_s:.2f} GB/s (rss +{grew1 >> 20} MiB); "
        f"phases s: header {sent.header_s:.4f} vote {sent.vote_s:.4f} transfer {sent.transfer_s:.3f} "
        f"(pack {sent.work_s:.3f}, wait {sent.wait_s:.3f}) commit {sent.commit_s:.4f}; "
        f"largest small tensor {largest_small >> 10} KiB"
    )
