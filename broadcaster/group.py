"""A stateless broadcast group formed by rendezvous over its own TCPStore, apart from torch's default group.

Rank 0 (the trainer's sender) hosts the store; inference ranks are 1..world_size-1. Invariants:
- rendezvous validates every rank's (rank, world_size, who) and fails on EVERY rank with one message
  naming the disagreeing sides, or with a deadline message naming the ranks that never joined;
- every key lives under `layercast/g{generation}/`, so a retry on a fresh generation never collides;
- every blocking wait has a deadline; on expiry or backend error the group is aborted (peers learn it
  through the store's abort key) and a `BroadcastError` is raised; an aborted group is never used again;
- `close()` frees the port even when an aborted backend still has an op stuck, so the same processes can
  form a fresh group at once (stuck backends are parked, never destroyed synchronously).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import uuid
from types import TracebackType
from typing import Literal

import torch
import torch.distributed as dist

from broadcaster.errors import BroadcastError, BroadcastTimeout, PeerLost, RendezvousError

Backend = Literal["gloo", "nccl"]

_MEMBERS_KEY = "rdzv/members"
_ACKS_KEY = "rdzv/acks"
_ERROR_KEY = "rdzv/error"
_ABORT_KEY = "abort"
_PEER_CHECK_EVERY_S = 0.25
_MAX_POLL_SLEEP_S = 1e-3
_FAST_POLL_SLEEP_S = 5e-5
_FAST_POLL_FOR_S = 0.2
_LATE_JOIN_GRACE_S = 2.0  # rank 0 keeps a failed rendezvous readable this long for ranks still starting
# Gloo's abort() does not unblock an op that is already running, and destroying the backend joins its
# worker threads; parked backends keep such a destructor off the caller's path.
_PARKED: list[object] = []


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _describe(members: list[dict[str, object]]) -> str:
    ms = sorted(members, key=lambda m: int(str(m["rank"])))
    names = ", ".join(f"{m['rank']} ({m['who']})" for m in ms)
    return f"rank {names}" if len(ms) == 1 else f"ranks {names}"


def _find_problem(members: list[dict[str, object]], where: str) -> str | None:
    """The first inconsistency among the joined ranks, as a message naming them, or None."""
    by_ws: dict[int, list[dict[str, object]]] = {}
    for m in members:
        by_ws.setdefault(int(str(m["world_size"])), []).append(m)
    if len(by_ws) > 1:
        # Order the claims so the one rank 0 makes comes last ("X says 4, rank 0 (trainer) says 3").
        claims = sorted(by_ws.items(), key=lambda kv: any(int(str(m["rank"])) == 0 for m in kv[1]))
        parts = [f"{_describe(ms)} {'says' if len(ms) == 1 else 'say'} world_size={ws}" for ws, ms in claims]
        return f"world_size disagreement at {where}: " + ", ".join(parts)
    by_rank: dict[int, list[dict[str, object]]] = {}
    for m in members:
        by_rank.setdefault(int(str(m["rank"])), []).append(m)
    for rank, ms in sorted(by_rank.items()):
        if len(ms) > 1:
            who = " and ".join(f"{m['who']} (pid {m['pid']} on {m['host']})" for m in ms)
            return f"rank {rank} claimed twice at {where}: by {who}"
    for m in members:
        rank, ws = int(str(m["rank"])), int(str(m["world_size"]))
        if not 0 <= rank < ws:
            return f"rank {rank} ({m['who']}) is out of range for world_size={ws} at {where}"
    return None


def cancel_rendezvous(host: str, port: int, reason: str, generation: int = 0, timeout_s: float = 5.0) -> None:
    """Fail a rendezvous in progress at host:port from outside it (e.g. the trainer learned over HTTP
    that a server refused to join): every rank waiting in it raises `RendezvousError(reason)` at once
    instead of waiting for its deadline. Best effort: does nothing if the store is not reachable."""
    with contextlib.suppress(Exception):
        # A plain connect first: torch's client would retry an unreachable host for ~2x `timeout_s`.
        socket.create_connection((host, port), timeout=min(timeout_s, 1.0)).close()
        client = dist.TCPStore(host, port, None, False, _td(timeout_s))
        dist.PrefixStore(f"layercast/g{generation}/", client).compare_set(_ERROR_KEY, "", reason)


class Group:
    """One generation of the trainer→inference group. Construction is the rendezvous; see module doc.

    `timeout_s` bounds the whole rendezvous (store connect, all ranks joining, backend warm-up).
    `op_timeout_s` is the backend's own op timeout (Gloo's, NCCL's watchdog); keep it above every
    deadline in `Timeouts` (a receiver idling for a header included), since our deadlines must fire first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        world_size: int,
        rank: int,
        *,
        backend: Backend = "gloo",
        who: str = "",
        timeout_s: float = 60.0,
        generation: int = 0,
        op_timeout_s: float = 600.0,
        device: torch.device | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.host, self.port, self.world_size, self.rank = host, port, world_size, rank
        self.backend: Backend = backend
        self.who = who or ("trainer" if rank == 0 else f"inference pid {os.getpid()}")
        self.generation = generation
        self.where = f"{host}:{port} (generation {generation})"
        if backend == "gloo":
            self.device = torch.device("cpu")
        else:
            self.device = device or torch.device("cuda", torch.cuda.current_device())
        self._broken: str | None = None
        self._seq = 0
        self._server: dist.TCPStore | None = None
        self._client: dist.TCPStore | None = None
        self._pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None
        deadline = time.monotonic() + timeout_s
        try:
            self._connect(timeout_s, deadline)
            self._rendezvous(timeout_s, deadline)
            self._create_backend(deadline, op_timeout_s)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- rendezvous

    def _connect(self, timeout_s: float, deadline: float) -> None:
        if self.rank == 0:
            try:
                self._server = dist.TCPStore(
                    self.host, self.port, None, True, _td(timeout_s), wait_for_workers=False
                )
            except Exception as e:
                raise RendezvousError(
                    f"rank 0 ({self.who}) could not host the store at {self.where}: {e}"
                ) from e
        try:
            self._wait_for_store(deadline)
            left = max(deadline - time.monotonic(), 1.0)  # the store answered: connecting is quick
            self._client = dist.TCPStore(self.host, self.port, None, False, _td(left))
        except Exception as e:
            raise RendezvousError(
                f"rank {self.rank} ({self.who}) waited {timeout_s:.1f} s for rank 0 to host the store "
                f"at {self.where}: {e}"
            ) from e
        self.store = dist.PrefixStore(f"layercast/g{self.generation}/", self._client)

    def _wait_for_store(self, deadline: float) -> None:
        """Poll with plain TCP connects until rank 0's store accepts one, or raise at `deadline`: torch's
        TCPStore client retries with its own backoff and overruns a short deadline about twofold when
        the host is unreachable."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no store is accepting connections at {self.host}:{self.port}")
            try:
                with socket.create_connection((self.host, self.port), timeout=min(left, 1.0)):
                    return
            except OSError as e:
                if deadline - time.monotonic() <= 0:
                    raise TimeoutError(f"{self.host}:{self.port}: {e}") from e
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))

    def _rendezvous(self, timeout_s: float, deadline: float) -> None:
        me = {
            "rank": self.rank,
            "world_size": self.world_size,
            "who": self.who,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "nonce": uuid.uuid4().hex,
        }
        self.store.append(_MEMBERS_KEY, json.dumps(me) + "\n")
        while True:
            try:
                if self.store.check([_ERROR_KEY]):
                    self._rendezvous_failed(self.store.get(_ERROR_KEY).decode(), [])
                raw = self.store.get(_MEMBERS_KEY).decode()
            except RendezvousError:
                raise
            except Exception as e:
                raise RendezvousError(
                    f"rank {self.rank} ({self.who}) lost the store at {self.where} during rendezvous "
                    f"(rank 0 gone?): {e}"
                ) from e
            members = [json.loads(line) for line in raw.splitlines() if line]
            problem = _find_problem(members, self.where)
            if problem is not None:
                self._rendezvous_failed(problem, members)
            present = {int(m["rank"]) for m in members}
            missing = [r for r in range(self.world_size) if r not in present]
            if not missing:
                return
            if time.monotonic() >= deadline:
                self._rendezvous_failed(
                    f"rank {self.rank} ({self.who}) waited {timeout_s:.1f} s for ranks {missing} to join "
                    f"at {self.where}",
                    members,
                )
            time.sleep(0.01)

    def _rendezvous_failed(self, message: str, members: list[dict[str, object]]) -> None:
        """Publish the first failure (first writer wins), make sure peers can read it, raise it."""
        try:
            message = self.store.compare_set(_ERROR_KEY, "", message).decode()
            self.store.add(_ACKS_KEY, 1)
            if self.rank == 0:
                self._linger_for_readers(members)
        except Exception:
            pass  # the store is gone: the message we have is the best we can say
        raise RendezvousError(message)

    def _linger_for_readers(self, members: list[dict[str, object]]) -> None:
        """Rank 0 keeps hosting the store until every joined rank has read the verdict, giving ranks not
        yet joined (fewer than any claimed world size) a short grace to join and read it too."""
        expected = max([self.world_size, *(int(str(m["world_size"])) for m in members)])
        give_up = time.monotonic() + 5.0
        quiet_since: float | None = None
        while (now := time.monotonic()) < give_up:
            joined = len(self.store.get(_MEMBERS_KEY).decode().splitlines())
            if self.store.add(_ACKS_KEY, 0) < joined:
                quiet_since = None
            elif joined >= expected or (quiet_since is not None and now - quiet_since > _LATE_JOIN_GRACE_S):
                return
            else:
                quiet_since = quiet_since or now
            time.sleep(0.01)

    def _create_backend(self, deadline: float, op_timeout_s: float) -> None:
        pg_store = dist.PrefixStore("pg/", self.store)
        pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL
        if self.backend == "gloo":
            pg = dist.ProcessGroupGloo(pg_store, self.rank, self.world_size, _td(deadline - time.monotonic()))
            pg._set_default_timeout(_td(op_timeout_s))
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = _td(op_timeout_s)
            pg = dist.ProcessGroupNCCL(pg_store, self.rank, self.world_size, opts)
        self._pg = pg
        # A warm-up all_reduce proves every link (and, on NCCL, builds the communicator) within the deadline.
        probe = torch.ones(1, dtype=torch.int64, device=self.device)
        try:
            self.wait(self.all_reduce(probe, dist.ReduceOp.SUM), deadline - time.monotonic(), "warm-up")
        except BroadcastError as e:
            raise RendezvousError(f"rendezvous at {self.where} failed after all ranks joined: {e}") from e
        if int(probe.item()) != self.world_size:
            raise RendezvousError(f"warm-up all_reduce gave {int(probe.item())}, expected {self.world_size}")

    # ---------------------------------------------------------------- collectives

    @property
    def broken(self) -> str | None:
        """Why the group was aborted, or None while it is usable."""
        return self._broken

    def next_seq(self) -> int:
        """The group-local number of the next sync; every rank calls it once per sync, in lockstep."""
        self._seq += 1
        return self._seq

    def check_health(self) -> None:
        """Raise if the group was aborted here or elsewhere, or a late rank reported a rendezvous error."""
        if self._broken is not None:
            raise PeerLost(f"rank {self.rank}: the group at {self.where} was aborted: {self._broken}")
        self._check_peers()
        try:
            late = self.store.check([_ERROR_KEY])
        except Exception as e:
            self._fail(PeerLost(f"rank {self.rank} lost the store at {self.where}: {e}"))
        if late:
            self._fail(RendezvousError(self.store.get(_ERROR_KEY).decode()))

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.asyncOp = root, 0, True
        return self._backend().broadcast([tensor], opts)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> dist.Work:
        opts = dist.AllreduceOptions()
        opts.reduceOp, opts.asyncOp = op, True
        return self._backend().allreduce([tensor], opts)

    def wait(self, work: dist.Work, timeout_s: float, what: str) -> float:
        """Wait for `work` by polling, at most `timeout_s`; returns the seconds waited.

        On expiry, a backend error, or a peer's abort, the group is aborted and a `BroadcastError`
        naming `what`, this rank and the time waited is raised.
        """
        start = time.monotonic()
        if not work.is_completed():
            deadline = start + timeout_s
            next_peer_check = start + _PEER_CHECK_EVERY_S
            nap = 2e-5
            while not work.is_completed():
                now = time.monotonic()
                if now >= deadline:
                    self._fail(
                        BroadcastTimeout(
                            f"rank {self.rank} ({self.who}) waited {timeout_s:.1f} s for {what} "
                            f"at {self.where}; group aborted"
                        )
                    )
                if now >= next_peer_check:
                    self._check_peers()
                    next_peer_check = now + _PEER_CHECK_EVERY_S
                time.sleep(nap)
                # Poll tightly while a bucket's transfer is due (about a millisecond or a few on NVLink:
                # oversleeping would leave the wire idle), then back off for long waits.
                cap = _FAST_POLL_SLEEP_S if now - start < _FAST_POLL_FOR_S else _MAX_POLL_SLEEP_S
                nap = min(nap * 2, cap)
        try:
            work.wait()
        except Exception as e:
            # The store says more than the backend's "connection closed": rank 0 gone, or a peer's abort.
            self._check_peers()
            self._fail(PeerLost(f"rank {self.rank} ({self.who}): {what} failed at {self.where}: {e}"))
        return time.monotonic() - start

    def _check_peers(self) -> None:
        try:
            aborted = self.store.check([_ABORT_KEY])
            reason = self.store.get(_ABORT_KEY).decode() if aborted else ""
        except Exception as e:
            self._fail(
                PeerLost(f"rank {self.rank} ({self.who}) lost the store at {self.where} (rank 0 gone?): {e}")
            )
        if aborted:
            self._fail(PeerLost(f"rank {self.rank} ({self.who}): group at {self.where} aborted by {reason}"))

    def _fail(self, error: BroadcastError) -> None:
        self.abort(str(error))
        raise error

    def _backend(self) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
        if self._broken is not None:
            raise PeerLost(f"rank {self.rank}: the group at {self.where} was aborted: {self._broken}")
        assert self._pg is not None
        return self._pg

    # ---------------------------------------------------------------- teardown

    def abort(self, reason: str) -> None:
        """Mark the group dead, tell peers through the store (best effort) and abort the backend."""
        if self._broken is not None:
            return
        self._broken = reason
        with contextlib.suppress(Exception):
            self.store.compare_set(_ABORT_KEY, "", f"rank {self.rank} ({self.who}): {reason}")
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.abort()
            _PARKED.append(self._pg)
            self._pg = None

    def close(self) -> None:
        """Release the backend and the store; the port is free for a fresh group when this returns."""
        if self._pg is not None:
            try:
                if self.backend == "nccl":
                    # NCCL's shutdown() finalizes the communicator, which waits for every peer to do the
                    # same; peers close theirs only when told to (e.g. at their next /init_broadcaster),
                    # so a graceful close here would deadlock. abort() is local.
                    self._pg.abort()
                    _PARKED.append(self._pg)
                else:
                    self._pg.shutdown()
            except Exception:
                _PARKED.append(self._pg)
            self._pg = None
        self._broken = self._broken or "closed"
        self._client = None
        self._server = None  # the backend holds only client stores, so this frees the port

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
