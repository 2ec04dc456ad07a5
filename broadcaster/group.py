"""A stateless broadcast group formed by rendezvous over its own TCPStore, apart from torch's default group.

Rank 0 (the trainer's sender) hosts the store; inference ranks are 1..world_size-1. Invariants:
- rendezvous validates every rank's (rank, world_size, who) and fails on EVERY rank with one message
  naming the disagreeing sides, or with a deadline message naming the ranks that never joined;
- every key lives under `layercast/g{generation}/`, so a retry on a fresh generation never collides;
- every blocking wait has a deadline; on expiry or backend error the group is aborted (peers learn it
  through the store's abort key) and a `BroadcastError` is raised; an aborted group is never used again;
- every store operation is bounded: a rank 0 that stops answering (frozen, overloaded, cut off) fails one
  operation after `STORE_OP_TIMEOUT_S` (the client socket's own send/receive timeout; Linux), never a
  whole rendezvous timeout; any store failure is a `PeerLost` (a `RendezvousError` while forming) naming
  rank 0's address, after which the store is never touched again (its connection may be out of step) and
  `abort()` skips its best-effort store write;
- the store listens only on the address asked for (the host name resolved as a client resolves it, first
  address that binds), never on every interface unless asked for `0.0.0.0`/`::`;
- with a `secret`, a member entry is admitted only if it carries an HMAC-SHA256 (the secret over the
  entry and the per-group nonce rank 0 publishes when it hosts, so an entry cannot be replayed into
  another group or generation); every other entry is ignored (counted in the deadline message), exact
  replays count once, so no forged entry can cause a disagreement or a rank collision. Entries then carry
  no pid or host name. The secret is about admission: anyone who reaches the store can still delay or
  fail a rendezvous (bind to a private address for that);
- every raw store or backend exception raised while forming becomes a `RendezvousError` naming the
  address and what failed;
- `close()` frees the port even when an aborted backend still has an op stuck, so the same processes can
  form a fresh group at once (stuck backends are parked, never destroyed synchronously).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import socket
import struct
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

from broadcaster.errors import BroadcastError, BroadcastTimeout, PeerLost, RendezvousError, RendezvousTimeout
from broadcaster.shared_wire import SharedWire, SharedWireError, device_identity
from configs.api import Backend

WireBackend = Literal["gloo", "nccl", "ipc"]
_T = TypeVar("_T")

# One store operation (a request and its answer) may take this long before rank 0 counts as lost. The
# store is served by a C++ thread of the trainer, which answers in microseconds unless the process is
# frozen or the network is cut; the bound is also what `abort()` may block its caller at most.
STORE_OP_TIMEOUT_S = 3.0

# How a rendezvous verdict that is a missed deadline starts: ranks that read it (rather than reaching
# their own deadline first) raise `RendezvousTimeout` too.
_DEADLINE = "rendezvous deadline: "
_MEMBERS_KEY = "rdzv/members"
_ACKS_KEY = "rdzv/acks"
_ERROR_KEY = "rdzv/error"
_NONCE_KEY = "rdzv/nonce"
_ABORT_KEY = "abort"
_MAC_DOMAIN = b"layercast member entry v1"
_PEER_CHECK_EVERY_S = 0.25
_MAX_POLL_SLEEP_S = 1e-3
_FAST_POLL_SLEEP_S = 5e-5
_FAST_POLL_FOR_S = 0.2
_LATE_JOIN_GRACE_S = 2.0  # rank 0 keeps a failed rendezvous readable this long for ranks still starting
_LINGER_PAST_DEADLINE_S = 0.25  # ... but never longer than this past the rendezvous deadline
# Gloo's abort() does not unblock an op that is already running, and destroying the backend joins its
# worker threads; parked backends keep such a destructor off the caller's path.
_PARKED: list[object] = []


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on `host` only: its addresses in the order a client tries them, the first that
    binds. `0.0.0.0`/`::` (or an empty host) still mean every interface (`::` both IPv6 and IPv4)."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=0 if host else socket.AI_PASSIVE
    )
    problems: list[str] = []
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and ipaddress.ip_address(str(addr[0]).split("%")[0]).is_unspecified:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
            return sock
        except OSError as e:
            sock.close()
            problems.append(f"{addr[0]}: {e.strerror or e}")
    raise OSError(f"cannot listen on {host}:{port}: {'; '.join(problems) or 'no address'}")


def _sockets_to(port: int) -> dict[str, int]:
    """{socket id: fd} of this process's TCP sockets connected to remote port `port` ({} off Linux)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            try:
                link = os.readlink(f"/proc/self/fd/{name}")
                if not link.startswith("socket:"):
                    continue
                dup = os.dup(int(name))
            except (OSError, ValueError):
                continue
            try:
                s = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                continue
            with s, contextlib.suppress(OSError):
                if s.family in (socket.AF_INET, socket.AF_INET6) and s.getpeername()[1] == port:
                    found[link] = int(name)
    return found


def _bound_socket_ops(fds: list[int], seconds: float) -> None:
    """Make each send/receive on these sockets fail after `seconds` instead of blocking for ever: torch's
    store client waits on a silent server without any timeout of its own (check, set, compare_set...)."""
    tv = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    for fd in fds:
        with contextlib.suppress(OSError), socket.socket(fileno=fd) as s:
            try:  # the options belong to the socket, shared by every descriptor of it
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            finally:
                s.detach()  # torch owns `fd`


def _store_client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """A TCPStore client whose socket operations are bounded by `STORE_OP_TIMEOUT_S` (see `_sockets_to`:
    the client's socket is the one to `port` that was not there before it)."""
    before = _sockets_to(port)
    client = dist.TCPStore(host, port, None, False, _td(timeout_s))
    _bound_socket_ops([fd for key, fd in _sockets_to(port).items() if key not in before], STORE_OP_TIMEOUT_S)
    return client


def _canonical(entry: dict[str, object]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def _ident(m: dict[str, object]) -> str:
    if "pid" in m:
        return f"{m['who']} (pid {m['pid']} on {m['host']})"
    return f"{m['who']} (member {str(m.get('id', ''))[:8]})"


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
            return f"rank {rank} claimed twice at {where}: by {' and '.join(_ident(m) for m in ms)}"
    for m in members:
        rank, ws = int(str(m["rank"])), int(str(m["world_size"]))
        if not 0 <= rank < ws:
            return f"rank {rank} ({m['who']}) is out of range for world_size={ws} at {where}"
    return None


def auto_backend(members: list[dict[str, object]]) -> WireBackend:
    """What `auto` means for a complete group (every rank asked for it), the same on every rank: gloo when
    any rank is on a CPU; else ipc when every rank is on rank 0's GPU (colocated), else nccl (one GPU per
    rank; `_transport_problem` refuses anything else before this is asked)."""
    if not _all_cuda(members):
        return "gloo"
    home = str(next(m for m in members if m["rank"] == 0).get("device", ""))
    return "ipc" if all(str(m.get("device", "")) == home for m in members) else "nccl"


def _all_cuda(members: list[dict[str, object]]) -> bool:
    return all(str(m.get("device", "")).startswith("cuda:") for m in members)


def _shared_gpus(members: list[dict[str, object]], where: str, asked: str) -> str | None:
    """For nccl (asked, or what `auto` falls back to): ranks sharing a GPU, named; NCCL refuses them."""
    by_device: dict[str, list[dict[str, object]]] = {}
    for m in members:
        by_device.setdefault(str(m.get("device", "")), []).append(m)
    shared = {d: ms for d, ms in by_device.items() if len(ms) > 1 and d}
    if not shared:
        return None
    detail = "; ".join(f"{_describe(ms)} share {d}" for d, ms in sorted(shared.items()))
    if asked == "auto":
        return (
            f"backend auto at {where} found ranks sharing a GPU while others are on GPUs of their own: "
            f"{detail}; one group does not mix ipc and nccl: sync the servers on the trainer's GPU with "
            "their own broadcaster (backend ipc) and the others with another (nccl)"
        )
    return (
        f"nccl needs one GPU per rank at {where}: {detail}; a server on the trainer's GPU needs backend ipc "
        "(auto picks it when every worker is on the trainer's GPU)"
    )


def _transport_problem(members: list[dict[str, object]], where: str) -> str | None:
    """Ranks that asked for different backends; `ipc` ranks not on rank 0's device; nccl (asked, or `auto`
    with every rank so far on a GPU and some off rank 0's) with ranks sharing a GPU; named, or None. A
    problem found in a partial member list stays one when the rest join (for `auto`: unless a CPU rank
    joins, which would have made it gloo; refused anyway)."""
    by_backend: dict[str, list[dict[str, object]]] = {}
    for m in members:
        by_backend.setdefault(str(m.get("backend", "")), []).append(m)
    if len(by_backend) > 1:
        parts = [f"{_describe(ms)} asked for {b or '(unknown)'}" for b, ms in sorted(by_backend.items())]
        return f"backend disagreement at {where}: " + ", ".join(parts)
    first = [m for m in members if m["rank"] == 0]
    if not first:
        return None
    asked = next(iter(by_backend), "")
    home = str(first[0].get("device", ""))
    away = [m for m in members if str(m.get("device", "")) != home]
    if asked == "nccl" or (asked == "auto" and away and _all_cuda(members)):
        return _shared_gpus(members, where, asked)
    if asked != "ipc" or not away:
        return None
    elsewhere = ", ".join(f"{_describe([m])} is on {m.get('device') or '(unknown)'}" for m in away)
    return (
        f"the ipc backend needs every rank on rank 0's device ({home}) at {where}: {elsewhere}; "
        "use nccl (or gloo) for servers on other devices"
    )


class _BoundedStore:
    """The group's store as callers outside this module see it (`group.store`): keys under the group's
    prefix, every operation bounded, and any failure a `PeerLost` that aborts the group (see `Group._op`)."""

    def __init__(self, group: Group, raw: dist.Store) -> None:
        self._group, self._raw = group, raw

    def set(self, key: str, value: str | bytes) -> None:
        self._group._op(f"setting {key!r}", lambda: self._raw.set(key, value))

    def get(self, key: str) -> bytes:
        return self._group._op(f"reading {key!r}", lambda: self._raw.get(key))

    def check(self, keys: list[str]) -> bool:
        return self._group._op(f"checking {keys!r}", lambda: self._raw.check(keys))

    def add(self, key: str, amount: int) -> int:
        return self._group._op(f"adding to {key!r}", lambda: self._raw.add(key, amount))

    def append(self, key: str, value: str | bytes) -> None:
        self._group._op(f"appending to {key!r}", lambda: self._raw.append(key, value))

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        return self._group._op(f"setting {key!r}", lambda: self._raw.compare_set(key, expected, desired))

    def delete_key(self, key: str) -> bool:
        return self._group._op(f"deleting {key!r}", lambda: self._raw.delete_key(key))


class Group:
    """One generation of the trainer→inference group. Construction is the rendezvous; see module doc.

    `timeout_s` bounds the whole rendezvous (store connect, all ranks joining, backend warm-up).
    `op_timeout_s` is the backend's own op timeout (Gloo's, NCCL's watchdog); keep it above every
    deadline in `Timeouts` (a receiver idling for a header included), since our deadlines must fire first.
    `secret` (the same on every rank, e.g. `secrets.token_hex(32)` per group) admits only members that
    prove it; without one any process that reaches the store can join.
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
        secret: bytes | str | None = None,
        cancelled: Callable[[], str | None] | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if backend not in ("auto", "gloo", "nccl", "ipc"):
            raise ValueError(f"backend must be 'auto', 'gloo', 'nccl' or 'ipc', got {backend!r}")
        if secret is not None and not secret:
            raise ValueError("secret must not be empty (pass None for no secret)")
        self.host, self.port, self.world_size, self.rank = host, port, world_size, rank
        # What this rank asked for; `auto` is decided at the rendezvous, from every rank's device, and
        # `backend` holds the decision from then on.
        self.asked: Backend = backend
        self.backend: WireBackend = "gloo" if backend == "auto" else backend
        self.who = who or ("trainer" if rank == 0 else f"inference pid {os.getpid()}")
        self.generation = generation
        self.where = f"{host}:{port} (generation {generation})"
        if backend == "gloo":
            self.device = torch.device("cpu")
        elif backend in ("ipc", "auto") and device is None:
            cuda = torch.cuda.is_available()
            self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        else:
            self.device = device or torch.device("cuda", torch.cuda.current_device())
        # The physical device, compared at the rendezvous: ipc ranks must share rank 0's, nccl ranks must
        # not share one, and `auto` chooses by them.
        self.device_id = device_identity(self.device) if backend != "gloo" else ""
        self._key = secret.encode() if isinstance(secret, str) else secret
        # Polled by the rendezvous loop (e.g. another thread of this process learned that a peer will never
        # join): a reason ends the rendezvous on every rank with it, through this rank's own store client.
        self._cancelled = cancelled
        self._nonce: str | None = None
        self._who0 = "trainer" if rank == 0 else "the trainer"  # rank 0's `who`, once it is known
        self._formed = False
        self._store_lost: str | None = None
        self._broken: str | None = None
        self._abort_requested: str | None = None  # set by another thread; acted on by this rank's next wait
        self._seq = 0
        self._server: dist.TCPStore | None = None
        self._client: dist.TCPStore | None = None
        self._store: dist.Store | None = None
        self._pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None
        self._wire: SharedWire | None = None
        deadline = time.monotonic() + timeout_s
        try:
            self._connect(timeout_s, deadline)
            self._rendezvous(timeout_s, deadline)
            self._create_backend(deadline, op_timeout_s)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- the store

    def _op(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run one store operation (bounded by the client socket's timeout). A failure marks the store
        lost for good and raises `RendezvousError` while forming, else aborts the group with `PeerLost`."""
        if self._store_lost is None:
            start = time.monotonic()
            try:
                return fn()
            except Exception as e:
                self._store_lost = self._lost_message(what, time.monotonic() - start, e)
        if not self._formed:
            raise RendezvousError(self._store_lost)
        self._fail(PeerLost(self._store_lost))
        raise AssertionError("unreachable")  # _fail raises

    def _lost_message(self, what: str, took: float, e: Exception) -> str:
        me = f"rank {self.rank} ({self.who})"
        if took >= 0.9 * STORE_OP_TIMEOUT_S or "timeout" in str(e).lower():
            return (
                f"{me}: rank 0 ({self._who0}) at {self.host}:{self.port} stopped answering the store for "
                f"{took:.1f} s ({what}, generation {self.generation}): frozen, overloaded or cut off"
            )
        return f"{me} lost the store at {self.where} ({what}; rank 0 gone?): {type(e).__name__}: {e}"

    # ---------------------------------------------------------------- rendezvous

    def _connect(self, timeout_s: float, deadline: float) -> None:
        if self.rank == 0:
            try:
                listener = _listen(self.host, self.port)
            except OSError as e:
                raise RendezvousError(
                    f"rank 0 ({self.who}) could not host the store at {self.where}: {e}"
                ) from e
            self.port = int(listener.getsockname()[1])  # port 0 asks for a free one
            self.where = f"{self.host}:{self.port} (generation {self.generation})"
            try:
                self._server = dist.TCPStore(
                    self.host,
                    self.port,
                    None,
                    True,
                    _td(timeout_s),
                    wait_for_workers=False,
                    master_listen_fd=listener.fileno(),
                )
            except Exception as e:
                listener.close()
                raise RendezvousError(
                    f"rank 0 ({self.who}) could not host the store at {self.where}: {e}"
                ) from e
            listener.detach()  # the store's server owns the socket now and closes it with itself
        try:
            self._wait_for_store(deadline)
            left = max(deadline - time.monotonic(), 1.0)  # the store answered: connecting is quick
            self._client = _store_client(self.host, self.port, left)
        except Exception as e:
            raise RendezvousTimeout(
                f"rank {self.rank} ({self.who}) waited {timeout_s:.1f} s for rank 0 to host the store "
                f"at {self.where}: {e}"
            ) from e
        self._store = dist.PrefixStore(f"layercast/g{self.generation}/", self._client)
        self.store = _BoundedStore(self, self._store)

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

    def _mac(self, entry: dict[str, object]) -> str:
        assert self._key is not None and self._nonce is not None
        message = b"\n".join(
            [_MAC_DOMAIN, str(self.generation).encode(), self._nonce.encode(), _canonical(entry)]
        )
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def _entry(self) -> str:
        me: dict[str, object] = {
            "rank": self.rank,
            "world_size": self.world_size,
            "who": self.who,
            "id": uuid.uuid4().hex,
            "backend": self.asked,
            "device": self.device_id,
        }
        if self._key is None:
            me |= {"pid": os.getpid(), "host": socket.gethostname()}
        else:
            me["mac"] = self._mac(me)
        return json.dumps(me)

    def _admit(self, raw: str) -> tuple[list[dict[str, object]], int]:
        """(members admitted, number of entries ignored): well-formed entries whose MAC verifies (any
        well-formed entry without a secret); an entry seen twice counts once."""
        members: list[dict[str, object]] = []
        seen: set[bytes] = set()
        ignored = 0
        for line in raw.splitlines():
            if not line.strip():
                continue
            m = self._verify(line)
            if m is None:
                ignored += 1
            elif (key := _canonical(m)) not in seen:
                seen.add(key)
                members.append(m)
        return members, ignored

    def _verify(self, line: str) -> dict[str, object] | None:
        try:
            m = json.loads(line)
        except ValueError:
            return None
        if not isinstance(m, dict):
            return None
        if type(m.get("rank")) is not int or type(m.get("world_size")) is not int:
            return None
        if not isinstance(m.get("who"), str):
            return None
        if self._key is None:
            return m
        if self._nonce is None:
            return None
        mac = m.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(mac, self._mac(m)):
            return None
        m["mac"] = mac
        return m

    def _rendezvous(self, timeout_s: float, deadline: float) -> None:
        store = self._store
        assert store is not None
        if self.rank == 0:
            self._nonce = secrets.token_hex(16)
            nonce = self._nonce
            self._op("publishing the group nonce", lambda: store.set(_NONCE_KEY, nonce))
        joined = False
        members: list[dict[str, object]] = []
        ignored = 0
        while True:
            why = self._cancelled() if self._cancelled is not None else None
            if why:
                self._rendezvous_failed(why, members, deadline)
            if self._op("checking the rendezvous verdict", lambda: store.check([_ERROR_KEY])):
                verdict = self._op("reading the rendezvous verdict", lambda: store.get(_ERROR_KEY))
                text = verdict.decode()
                self._rendezvous_failed(text, [], deadline, timed_out=text.startswith(_DEADLINE))
            if (
                not joined
                and self._key is not None
                and self._nonce is None
                and self._op("checking for the group nonce", lambda: store.check([_NONCE_KEY]))
            ):
                self._nonce = self._op("reading the group nonce", lambda: store.get(_NONCE_KEY)).decode()
            if not joined and (self._key is None or self._nonce is not None):
                entry = self._entry() + "\n"
                self._op("joining", lambda e=entry: store.append(_MEMBERS_KEY, e))  # type: ignore[misc]
                joined = True
            if joined:
                raw = self._op("reading the members", lambda: store.get(_MEMBERS_KEY)).decode()
                members, ignored = self._admit(raw)
                problem = (
                    self._secret_mismatch(members)
                    or _find_problem(members, self.where)
                    or _transport_problem(members, self.where)
                )
                if problem is not None:
                    self._rendezvous_failed(problem, members, deadline)
                present = {int(str(m["rank"])) for m in members}
                missing = [r for r in range(self.world_size) if r not in present]
                if not missing:
                    self._who0 = next(str(m["who"]) for m in members if m["rank"] == 0)
                    if self.asked == "auto":
                        self.backend = auto_backend(members)
                        if self.backend == "gloo":
                            self.device = torch.device("cpu")
                    return
            if time.monotonic() >= deadline:
                me = f"{_DEADLINE}rank {self.rank} ({self.who}) waited {timeout_s:.1f} s"
                if not joined:
                    message = f"{me} for rank 0 to publish the group nonce at {self.where}"
                else:
                    message = f"{me} for ranks {missing} to join at {self.where}"
                if ignored:
                    why = "did not prove the group secret" if self._key is not None else "were malformed"
                    message += f"; ignored {ignored} member entries that {why}"
                self._rendezvous_failed(message, members, deadline, timed_out=True)
            time.sleep(0.01)

    def _secret_mismatch(self, members: list[dict[str, object]]) -> str | None:
        """Without a secret, an entry that carries a MAC means a rank was given one: say so at once (with
        a secret, entries without a valid MAC are only ignored: a forger must not be able to fail us)."""
        if self._key is not None:
            return None
        proving = [m for m in members if "mac" in m]
        if not proving:
            return None
        plain = [m for m in members if "mac" not in m]
        return (
            f"group secret mismatch at {self.where}: {_describe(proving)} "
            f"{'uses' if len(proving) == 1 else 'use'} a group secret, {_describe(plain)} "
            f"{'does' if len(plain) == 1 else 'do'} not"
        )

    def _rendezvous_failed(
        self, message: str, members: list[dict[str, object]], deadline: float, timed_out: bool = False
    ) -> None:
        """Publish the first failure (first writer wins), make sure peers can read it, raise it (as a
        `RendezvousTimeout` when this rank's own deadline passed, whichever rank's message won)."""
        if self._store_lost is None and self._store is not None:
            try:
                message = self._store.compare_set(_ERROR_KEY, "", message).decode()
                self._store.add(_ACKS_KEY, 1)
                if self.rank == 0:
                    self._linger_for_readers(members, deadline)
            except Exception:
                pass  # the store is gone: the message we have is the best we can say
        if timed_out:
            raise RendezvousTimeout(message)
        raise RendezvousError(message)

    def _linger_for_readers(self, members: list[dict[str, object]], deadline: float) -> None:
        """Rank 0 keeps hosting the store until every admitted rank has read the verdict, giving ranks not
        yet joined (fewer than any claimed world size) a short grace to join and read it too; never long
        past the rendezvous deadline (a rank that has not joined by then is past its own)."""
        assert self._store is not None
        expected = max([self.world_size, *(int(str(m["world_size"])) for m in members)])
        now = time.monotonic()
        give_up = min(now + 5.0, max(now, deadline) + _LINGER_PAST_DEADLINE_S)
        quiet_since: float | None = None
        while (now := time.monotonic()) < give_up:
            # `get` of a key nobody set waits for the store's timeout: a refusal can come before any join
            listed = self._store.check([_MEMBERS_KEY])
            joined = len(self._admit(self._store.get(_MEMBERS_KEY).decode())[0]) if listed else 0
            if self._store.add(_ACKS_KEY, 0) < joined:
                quiet_since = None
            elif joined >= expected or (quiet_since is not None and now - quiet_since > _LATE_JOIN_GRACE_S):
                return
            else:
                quiet_since = quiet_since or now
            time.sleep(0.01)

    def _create_backend(self, deadline: float, op_timeout_s: float) -> None:
        assert self._store is not None
        pg_store = dist.PrefixStore("pg/", self._store)
        pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None
        try:
            if self.backend == "ipc":
                self._wire = SharedWire(self.store, self.rank, self.world_size, self.device, self.device_id)
            elif self.backend == "gloo":
                pg = dist.ProcessGroupGloo(
                    pg_store, self.rank, self.world_size, _td(deadline - time.monotonic())
                )
                pg._set_default_timeout(_td(op_timeout_s))
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = _td(op_timeout_s)
                pg = dist.ProcessGroupNCCL(pg_store, self.rank, self.world_size, opts)
        except Exception as e:
            raise RendezvousError(
                f"rank {self.rank} ({self.who}): the {self.backend} backend could not connect all "
                f"{self.world_size} ranks at {self.where} by the rendezvous deadline (a rank that joined "
                f"the store never came?): {type(e).__name__}: {e}"
            ) from e
        self._pg = pg
        # A warm-up all_reduce proves every link (and, on NCCL, builds the communicator) within the deadline.
        probe = torch.ones(1, dtype=torch.int64, device=self.device)
        try:
            self.wait(self.all_reduce(probe, dist.ReduceOp.SUM), deadline - time.monotonic(), "warm-up")
        except BroadcastError as e:
            raise RendezvousError(f"rendezvous at {self.where} failed after all ranks joined: {e}") from e
        if int(probe.item()) != self.world_size:
            raise RendezvousError(f"warm-up all_reduce gave {int(probe.item())}, expected {self.world_size}")
        if self._wire is not None:
            self._probe_shared_slot(deadline)
        self._formed = True
        if self._client is not None:  # store gets wait for a key at most this long (ours exist already)
            self._client.set_timeout(_td(STORE_OP_TIMEOUT_S))

    def _probe_shared_slot(self, deadline: float) -> None:
        """ipc: one broadcast through a shared slot, so a rank that cannot map rank 0's memory (another
        device after all, another user, no /dev/shm) fails the rendezvous, not the first sync."""
        pattern = torch.arange(64, dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            buf = self.bucket_buffers(64, 1)[0]
            buf.copy_(pattern)
        else:
            buf = torch.zeros(64, dtype=torch.uint8, device=self.device)
        try:
            self.wait(self.broadcast(buf), max(deadline - time.monotonic(), 1.0), "the shared-memory probe")
        except (BroadcastError, SharedWireError) as e:
            raise RendezvousError(f"rendezvous at {self.where}: shared memory does not work: {e}") from e
        if not torch.equal(buf, pattern):
            raise RendezvousError(f"rendezvous at {self.where}: the shared-memory probe read wrong bytes")

    # ---------------------------------------------------------------- collectives

    @property
    def broken(self) -> str | None:
        """Why the group was aborted, or None while it is usable."""
        return self._broken

    def next_seq(self) -> int:
        """The group-local number of the next sync; every rank calls it once per sync, in lockstep."""
        self._seq += 1
        return self._seq

    def peek_seq(self) -> int:
        """The number `next_seq()` will return, without taking it."""
        return self._seq + 1

    def request_abort(self, reason: str) -> None:
        """Ask, from another thread, that the wait in progress (or the next one) abort the group with
        `reason` (the store client is not shared across threads: the waiting thread does the abort)."""
        self._abort_requested = reason

    def check_health(self) -> None:
        """Raise if the group was aborted here or elsewhere, a late rank reported a rendezvous error, or
        rank 0 stopped answering the store (within `STORE_OP_TIMEOUT_S`)."""
        if self._broken is not None:
            raise PeerLost(f"rank {self.rank}: the group at {self.where} was aborted: {self._broken}")
        self._check_peers()
        store = self._store
        assert store is not None
        if self._op("checking for a rendezvous error", lambda: store.check([_ERROR_KEY])):
            late = self._op("reading the rendezvous error", lambda: store.get(_ERROR_KEY)).decode()
            self._fail(RendezvousError(late))

    def bucket_buffers(self, nbytes: int, count: int) -> list[torch.Tensor]:
        """Rank 0's buffers to pack `count` buckets of up to `nbytes` into: fresh tensors, or on the `ipc`
        backend the shared slots themselves (so a bucket goes out without a copy)."""
        if self._wire is not None:
            return self._wire.buffers(nbytes, count)
        return [torch.empty(nbytes, dtype=torch.uint8, device=self.device) for _ in range(count)]

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> dist.Work:
        if self._wire is not None:
            self._backend_usable()
            return self._wire.broadcast(tensor)  # type: ignore[return-value]
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.asyncOp = root, 0, True
        return self._backend().broadcast([tensor], opts)

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> dist.Work:
        if self._wire is not None:
            self._backend_usable()
            return self._wire.all_reduce(tensor, op)  # type: ignore[return-value]
        opts = dist.AllreduceOptions()
        opts.reduceOp, opts.asyncOp = op, True
        return self._backend().allreduce([tensor], opts)

    def wait(self, work: dist.Work, timeout_s: float, what: str) -> float:
        """Wait for `work` by polling, at most `timeout_s` (plus one store operation's bound when rank 0
        stops answering mid-check); returns the seconds waited.

        On expiry, a backend error, a peer's abort or a lost store, the group is aborted and a
        `BroadcastError` naming `what`, this rank and the time waited is raised.
        """
        start = time.monotonic()
        if not work.is_completed():
            deadline = start + timeout_s
            next_peer_check = start + _PEER_CHECK_EVERY_S
            nap = 2e-5
            while not work.is_completed():
                now = time.monotonic()
                if self._abort_requested is not None:
                    self._fail(PeerLost(f"rank {self.rank} ({self.who}): {self._abort_requested}"))
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
        store = self._store
        assert store is not None
        if self._op("checking for an abort", lambda: store.check([_ABORT_KEY])):
            reason = self._op("reading the abort", lambda: store.get(_ABORT_KEY)).decode()
            self._fail(PeerLost(f"rank {self.rank} ({self.who}): group at {self.where} aborted by {reason}"))

    def _fail(self, error: BroadcastError) -> None:
        self.abort(str(error))
        raise error

    def _backend_usable(self) -> None:
        if self._broken is not None:
            raise PeerLost(f"rank {self.rank}: the group at {self.where} was aborted: {self._broken}")

    def _backend(self) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
        self._backend_usable()
        assert self._pg is not None
        return self._pg

    # ---------------------------------------------------------------- teardown

    def abort(self, reason: str) -> None:
        """Mark the group dead, tell peers through the store (best effort: skipped once the store is lost,
        else bounded by `STORE_OP_TIMEOUT_S`) and abort the backend."""
        if self._broken is not None:
            return
        self._broken = reason
        if self._store is not None and self._store_lost is None:
            start = time.monotonic()
            try:
                self._store.compare_set(_ABORT_KEY, "", f"rank {self.rank} ({self.who}): {reason}")
            except Exception as e:
                self._store_lost = self._lost_message("publishing the abort", time.monotonic() - start, e)
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
        if self._wire is not None:
            self._wire.close(linger_s=0.0 if self._broken else 2.0)
            self._wire = None
        self._broken = self._broken or "closed"
        self._client = None
        self._server = None  # the backend holds only client stores, so this frees the port

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
