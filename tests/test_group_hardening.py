"""Hostile cases for the group's store: a frozen trainer, the listening address, forged members.

Real processes and threads, a real TCPStore, Gloo on CPU. Every case that could hang runs under a
watchdog thread, so a regression fails with the time it took instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist

from broadcaster.errors import BroadcastError, PeerLost, RendezvousError, RendezvousTimeout
from broadcaster.group import STORE_OP_TIMEOUT_S, Group

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRET = "5e" * 32
SLACK_S = 1.5  # scheduling on a shared 2-core machine


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class InThread:
    """Run `fn` in a daemon thread; `outcome()` is (value or exception, seconds), or fails the test if
    `fn` is still running `limit_s` after it started (a hang, reported instead of hanging pytest)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.took = 0.0
        self.start = time.monotonic()

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as e:
                self.result = e
            self.took = time.monotonic() - self.start

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def outcome(self, limit_s: float) -> tuple[Any, float]:
        self.thread.join(max(limit_s - (time.monotonic() - self.start), 0.0))
        if self.thread.is_alive():
            pytest.fail(f"still blocked after {time.monotonic() - self.start:.1f} s (limit {limit_s:.1f} s)")
        return self.result, self.took


def raw_members(port: int, generation: int = 0) -> dist.PrefixStore:
    """What any process that reaches the port can do: a plain TCPStore client under the group's prefix."""
    client = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=5))
    return dist.PrefixStore(f"layercast/g{generation}/", client)


def wait_for_key(store: dist.Store, key: str, limit_s: float = 10.0) -> None:
    give_up = time.monotonic() + limit_s
    while not store.check([key]):
        assert time.monotonic() < give_up, f"{key} never appeared"
        time.sleep(0.01)


def entries(store: dist.Store) -> list[str]:
    return [line for line in store.get("rdzv/members").decode().splitlines() if line]


# ------------------------------------------------------------------ A: a frozen trainer

HOST_GROUPS = """
import sys, time
from broadcaster.group import Group
groups = [Group("127.0.0.1", int(p), 2, 0, who="trainer", timeout_s=60) for p in sys.argv[1:]]
print("hosting", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def frozen_trainer() -> Iterator[dict[str, Group]]:
    """Three formed 2-rank groups whose rank 0 lives in a child process, then SIGSTOPped."""
    names = ["health", "wait", "abort"]
    ports = [free_port() for _ in names]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_CPP_LOG_LEVEL": "ERROR"}
    child = subprocess.Popen(
        [sys.executable, "-c", HOST_GROUPS, *map(str, ports)], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    groups: dict[str, Group] = {}
    try:
        for name, port in zip(names, ports, strict=True):
            groups[name] = Group("127.0.0.1", port, 2, 1, who=f"server ({name})", timeout_s=60)
        assert child.stdout is not None and child.stdout.readline().strip() == b"hosting"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.3)  # stopped for sure
        yield groups
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait(10)
        for g in groups.values():
            g.close()


def test_check_health_against_a_frozen_trainer_fails_within_the_store_bound(
    frozen_trainer: dict[str, Group],
) -> None:
    g = frozen_trainer["health"]
    err, took = InThread(g.check_health).outcome(STORE_OP_TIMEOUT_S + SLACK_S + 5.0)
    print(f"\ncheck_health against a SIGSTOPped trainer: {type(err).__name__} after {took:.2f} s")
    assert isinstance(err, PeerLost), err
    assert took < STORE_OP_TIMEOUT_S + SLACK_S
    assert f"rank 0 (trainer) at 127.0.0.1:{g.port} stopped answering the store for" in str(err), err
    assert g.broken is not None  # aborted: never used again


def test_wait_on_a_frozen_trainer_answers_by_its_deadline_plus_one_store_op(
    frozen_trainer: dict[str, Group],
) -> None:
    g = frozen_trainer["wait"]
    work = g.broadcast(torch.zeros(16), root=0)  # rank 0 is stopped: never completes
    err, took = InThread(lambda: g.wait(work, 2.0, "a broadcast from a frozen trainer")).outcome(
        2.0 + STORE_OP_TIMEOUT_S + SLACK_S + 5.0
    )
    print(f"\nwait(timeout_s=2) on a SIGSTOPped trainer: {type(err).__name__} after {took:.2f} s: {err}")
    assert isinstance(err, BroadcastError), err
    assert took < 2.0 + STORE_OP_TIMEOUT_S + SLACK_S
    assert "rank 1 (server (wait))" in str(err), err


def test_abort_never_blocks_longer_than_one_store_op(frozen_trainer: dict[str, Group]) -> None:
    g = frozen_trainer["abort"]
    err, took = InThread(lambda: g.abort("the test gives up")).outcome(STORE_OP_TIMEOUT_S + SLACK_S + 5.0)
    print(f"\nabort() with a SIGSTOPped trainer returned after {took:.2f} s")
    assert err is None and took < STORE_OP_TIMEOUT_S + SLACK_S
    err, took = InThread(g.check_health).outcome(1.0)  # aborted and the store lost: answers at once
    assert isinstance(err, PeerLost) and took < 0.5, err


# ------------------------------------------------------------------ B: the listening address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_the_store_listens_only_on_the_address_asked_for(host: str) -> None:
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    port = free_port("::1" if host == "::1" else "127.0.0.1")
    rank1 = InThread(lambda: Group(host, port, 2, 1, who="server", timeout_s=20))
    with Group(host, port, 2, 0, who="trainer", timeout_s=20) as g0:
        g1, _ = rank1.outcome(25.0)
        assert isinstance(g1, Group), g1
        listening = {
            c.laddr.ip
            for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        allowed = {info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        assert listening and listening <= allowed, (listening, allowed)
        assert not any(ipaddress.ip_address(ip).is_unspecified for ip in listening), listening
        if host == "127.0.0.1":
            assert listening == {"127.0.0.1"}
        x, y = torch.arange(5.0), torch.zeros(5)  # and the group works
        w1, w0 = g1.broadcast(y), g0.broadcast(x)
        g0.wait(w0, 10.0, "broadcast")
        g1.wait(w1, 10.0, "broadcast")
        assert torch.equal(x, y)
        g1.close()


# ------------------------------------------------------------------ C: admission by the group secret


def _forged(rank: int, world_size: int, **extra: object) -> str:
    entry = {"rank": rank, "world_size": world_size, "who": "forger", "pid": 1, "host": "evil", **extra}
    return json.dumps(entry) + "\n"


def test_forged_and_replayed_member_entries_are_ignored_and_the_real_ranks_join() -> None:
    port, deadline_s = free_port(), 20.0
    t0 = time.monotonic()
    ranks = {0: InThread(lambda: Group("127.0.0.1", port, 3, 0, timeout_s=deadline_s, secret=SECRET))}
    attacker = raw_members(port)
    wait_for_key(attacker, "rdzv/nonce")
    for line in (
        _forged(1, 3),  # no MAC
        _forged(1, 3, mac="00" * 32),  # a wrong MAC
        _forged(2, 5, mac="11" * 32),  # a wrong MAC claiming another world size
        "this is not json\n",
    ):
        attacker.append("rdzv/members", line)
    ranks[1] = InThread(
        lambda: Group("127.0.0.1", port, 3, 1, who="server 1", timeout_s=deadline_s, secret=SECRET)
    )
    give_up = time.monotonic() + 10.0
    while not (real := [e for e in entries(attacker) if '"server 1"' in e]):
        assert time.monotonic() < give_up
        time.sleep(0.01)
    replayed = json.loads(real[0])
    attacker.append("rdzv/members", real[0] + "\n")  # the same bytes again
    attacker.append("rdzv/members", json.dumps(replayed, indent=1).replace("\n", " ") + "\n")  # reformatted
    attacker.append("rdzv/members", json.dumps({**replayed, "rank": 2}) + "\n")  # MAC of another entry
    ranks[2] = InThread(
        lambda: Group("127.0.0.1", port, 3, 2, who="server 2", timeout_s=deadline_s, secret=SECRET)
    )
    groups = {r: t.outcome(deadline_s + 5.0) for r, t in ranks.items()}
    took = time.monotonic() - t0
    print(f"\n3 ranks formed with 7 forged/replayed entries in the store: {took:.2f} s")
    for r, (g, _) in groups.items():
        assert isinstance(g, Group), (r, g)
    assert took < deadline_s
    tensors = {r: torch.arange(7.0) if r == 0 else torch.zeros(7) for r in groups}
    works = {r: g.broadcast(tensors[r]) for r, (g, _) in groups.items()}
    for r, (g, _) in groups.items():
        g.wait(works[r], 10.0, "broadcast")
        assert torch.equal(tensors[r], torch.arange(7.0))
        g.close()


def test_a_rank_with_the_wrong_secret_is_not_admitted_and_the_trainer_says_why() -> None:
    port, deadline_s = free_port(), 2.0
    trainer = InThread(
        lambda: Group("127.0.0.1", port, 2, 0, who="trainer", timeout_s=deadline_s, secret=SECRET)
    )
    wait_for_key(raw_members(port), "rdzv/nonce")
    other = InThread(lambda: Group("127.0.0.1", port, 2, 1, who="server", timeout_s=6.0, secret="ab" * 32))
    err, took = trainer.outcome(deadline_s + 10.0)
    print(f"\nwrong secret: trainer raised {type(err).__name__} after {took:.2f} s: {err}")
    assert type(err) is RendezvousTimeout, err  # a deadline (a RendezvousError)
    assert "rank 0 (trainer) waited 2.0 s for ranks [1] to join" in str(err), err
    assert "ignored 1 member entries that did not prove the group secret" in str(err), err
    assert took < deadline_s + 1.0
    err1, took1 = other.outcome(10.0)
    assert isinstance(err1, RendezvousError) and took1 < 6.0, err1  # it read the trainer's verdict


def test_a_secret_on_one_side_only_fails_both_at_once() -> None:
    port = free_port()
    trainer = InThread(lambda: Group("127.0.0.1", port, 2, 0, who="trainer", timeout_s=20))
    server = InThread(lambda: Group("127.0.0.1", port, 2, 1, who="server", timeout_s=20, secret=SECRET))
    for err, took in (trainer.outcome(25.0), server.outcome(25.0)):
        assert isinstance(err, RendezvousError) and took < 10.0, err
        assert "group secret mismatch" in str(err) and "rank 1 (server) uses a group secret" in str(err), err


def test_a_forged_member_without_a_secret_fails_as_a_rendezvous_error_by_the_deadline() -> None:
    """No secret, no admission control: a forged rank 1 makes the trainer wait for a backend peer that
    never comes; that must still end at the deadline, as a `RendezvousError` naming the address."""
    port, deadline_s = free_port(), 2.0
    trainer = InThread(lambda: Group("127.0.0.1", port, 2, 0, who="trainer", timeout_s=deadline_s))
    attacker = raw_members(port)
    wait_for_key(attacker, "rdzv/members")
    attacker.append("rdzv/members", _forged(1, 2, nonce="x"))
    err, took = trainer.outcome(deadline_s + 30.0)
    print(f"\nforged member, no secret: trainer raised {type(err).__name__} after {took:.2f} s")
    assert type(err) is RendezvousError, repr(err)
    assert f"127.0.0.1:{port}" in str(err), err
    assert took < deadline_s + 1.0


def test_the_init_request_never_shows_the_group_secret() -> None:
    from pydantic import ValidationError

    from configs.api import InitBroadcasterRequest

    base = {"master_address": "127.0.0.1", "master_port": 29500, "world_size": 2, "rank_offset": 1}
    req = InitBroadcasterRequest.model_validate({**base, "group_secret": SECRET})
    assert SECRET not in repr(req) and SECRET not in str(req)
    assert req.model_dump(mode="json")["group_secret"] == SECRET  # still sent to the server
    for bad in (SECRET[:31], SECRET + "zz", "f" * 129):
        with pytest.raises(ValidationError) as info:
            InitBroadcasterRequest.model_validate({**base, "group_secret": bad})
        assert bad not in str(info.value)
