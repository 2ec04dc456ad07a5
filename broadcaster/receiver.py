"""An inference rank's side of a sync: check the header, vote, yield tensors as buckets land, commit.

Invariants:
- the caller's check (and the framing check) runs on the header before any data moves; one refusal
  anywhere makes every rank raise `SyncRefused`;
- at most three bucket buffers exist: while the consumer reads bucket k, bucket k+1 is on the wire and
  bucket k-1 is kept (its receive buffer is re-posted for bucket k+2 only when the consumer asks for a
  tensor of bucket k+1). So: A VIEW YIELDED FROM BUCKET k IS VALID UNTIL THE CONSUMER ASKS FOR A TENSOR
  OF BUCKET k+2 — a consumer that holds tensors until a group of them is complete (vLLM's layerwise
  reload holds a module's tensors) needs no copy when the group spans at most two consecutive buckets
  (`view_bucket`). Tensors larger than a bucket are assembled in a staging tensor of their own, which
  the consumer owns;
- `finish` drains whatever the consumer did not read, so the collectives stay in lockstep with the
  sender whatever the consumer does, then votes; all ranks get the same verdict.
On CUDA, waiting on a bucket's Work orders the current stream after the NCCL stream, and the next receive
into a buffer is enqueued after the consumer's kernels on the current stream, so no host sync is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import torch

from broadcaster.checksum import bucket_checksum
from broadcaster.control import header_cache, receive_header, tally
from broadcaster.errors import BroadcastError, PeerLost, SyncFailed, SyncRefused
from broadcaster.framing import dtype_from_name
from broadcaster.group import Group
from broadcaster.report import SyncReport
from broadcaster.timeouts import Timeouts
from configs.wire import SyncHeader

# Receive buffers: the bucket being read, the one on the wire, and the one before (kept for consumers
# that hold views until a group of tensors is complete).
RING = 3

HeaderCheck = Callable[[SyncHeader], "str | None"]
# Called with (bucket index, landed bucket bytes) before the bucket is checksummed or yielded from.
BucketHook = Callable[[int, torch.Tensor], None]


class Receiver:
    """Receives syncs on an inference rank (1..world_size-1) of `group`."""

    def __init__(
        self,
        group: Group,
        *,
        timeouts: Timeouts | None = None,
        max_bucket_size: int | None = None,
        bucket_hook: BucketHook | None = None,
    ) -> None:
        if group.rank == 0:
            raise ValueError("rank 0 is the sender; receivers are ranks 1..world_size-1")
        self.group = group
        self.timeouts = timeouts or Timeouts()
        self.max_bucket_size = max_bucket_size
        self.bucket_hook = bucket_hook

    def begin(
        self, check: HeaderCheck | None = None, *, header_timeout_s: float | None = None
    ) -> IncomingSync:
        """Wait for the next sync's header, vote on it (`check` returns None to accept or a reason to
        refuse) and return the accepted sync; raises `SyncRefused` if any rank refused."""
        g = self.group
        g.check_health()
        seq = g.next_seq()
        t0 = time.monotonic()
        got = receive_header(
            g, self.timeouts.header_s if header_timeout_s is None else header_timeout_s, self.max_bucket_size
        )
        t1 = time.monotonic()
        reason = got if isinstance(got, str) else None
        if reason is None and check is not None:
            assert isinstance(got, SyncHeader)
            try:
                reason = check(got)
            except Exception as e:
                reason = f"header check raised {type(e).__name__}: {e}"
        refusals = tally(g, seq, "accept", reason is not None, reason or "", self.timeouts.vote_s)
        t2 = time.monotonic()
        if refusals:
            raise SyncRefused(refusals)
        assert isinstance(got, SyncHeader)
        return IncomingSync(self, got, seq, header_s=t1 - t0, vote_s=t2 - t1)


class IncomingSync:
    """One accepted sync. Iterate it for `(name, tensor)` in manifest order, then call `finish`.

    As a context manager it finishes with ok=True on a clean exit, and with ok=False (reason: the
    exception) when the body raised, letting the body's exception propagate after the vote.
    """

    def __init__(
        self, receiver: Receiver, header: SyncHeader, seq: int, *, header_s: float, vote_s: float
    ) -> None:
        self.header = header
        self._receiver = receiver
        self._group = receiver.group
        self._seq = seq
        self._header_s, self._vote_s = header_s, vote_s
        self._sums: list[torch.Tensor] = []
        self._draining = False
        self._finished = False
        self._work_s = self._wait_s = 0.0
        self._peak = 0
        self._started = time.monotonic()
        self._stream = self._receive()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._stream

    def _receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        g, h = self._group, self.header
        sizes, entries, nb = h.bucket_sizes, h.entries, len(h.bucket_sizes)
        plan = header_cache(g).plan(h)
        nbuf = min(RING, nb)
        bufs = [torch.empty(h.max_bucket_size, dtype=torch.uint8, device=g.device) for _ in range(nbuf)]
        buffer_bytes = nbuf * h.max_bucket_size
        self._peak = buffer_bytes
        works: list[object] = [g.broadcast(bufs[k][: sizes[k]]) for k in range(min(2, nb))]
        staging: torch.Tensor | None = None
        hook = self._receiver.bucket_hook
        for k, size in enumerate(sizes):
            if k >= 1 and k + 1 < nb:
                # Bucket k+1 into the buffer of bucket k-2: the consumer asked for bucket k, so it is done
                # with k-2 (views of k-1 stay valid).
                works.append(g.broadcast(bufs[(k + 1) % nbuf][: sizes[k + 1]]))
            buf = bufs[k % nbuf][:size]
            self._wait_s += g.wait(
                works[k],  # type: ignore[arg-type]
                self._receiver.timeouts.bucket_s,
                f"bucket {k} of {nb} (sync {h.sync_id!r})",
            )
            if hook is not None:
                hook(k, buf)
            if h.checksum:
                self._sums.append(bucket_checksum(buf))
            for index, piece in plan[k]:
                if self._draining:
                    staging = None
                    break
                entry = entries[index]
                dtype = dtype_from_name(entry.dtype)
                src = buf[piece.bucket_offset : piece.bucket_offset + piece.nbytes]
                if len(entry.pieces) == 1:
                    tensor = src.view(dtype).view(entry.shape)
                else:
                    if piece.tensor_offset == 0:
                        staging = torch.empty(entry.nbytes, dtype=torch.uint8, device=g.device)
                        self._peak = max(self._peak, buffer_bytes + entry.nbytes)
                    assert staging is not None
                    staging[piece.tensor_offset : piece.tensor_offset + piece.nbytes].copy_(src)
                    if piece.tensor_offset + piece.nbytes < entry.nbytes:
                        continue
                    tensor, staging = staging.view(dtype).view(entry.shape), None
                handed = time.monotonic()
                yield entry.name, tensor
                del tensor
                self._work_s += time.monotonic() - handed

    def finish(self, ok: bool = True, reason: str = "") -> SyncReport:
        """Drain unread buckets, compare checksums, vote `ok` (with `reason` if not) and return the
        report; raises `SyncFailed` naming every failed rank if any rank (sender included) failed."""
        if self._finished:
            raise RuntimeError("finish() was already called for this sync")
        self._finished = True
        g, h, to = self._group, self.header, self._receiver.timeouts
        if g.broken is not None:
            raise PeerLost(f"rank {g.rank}: cannot commit, the group was aborted: {g.broken}")
        self._draining = True
        for _ in self._stream:
            pass
        t4 = time.monotonic()
        reasons = [reason] if not ok else []
        if h.checksum and h.bucket_sizes:
            theirs = torch.empty(len(h.bucket_sizes), 3, dtype=torch.int64, device=g.device)
            g.wait(g.broadcast(theirs), to.commit_s, f"the checksums of sync {h.sync_id!r}")
            bad = (theirs != torch.stack(self._sums)).any(1).nonzero().flatten().tolist()
            if bad:
                reasons.append(f"checksum mismatch in bucket(s) {bad} of {len(h.bucket_sizes)}")
        failures = tally(g, self._seq, "commit", bool(reasons), "; ".join(reasons) or "failed", to.commit_s)
        t5 = time.monotonic()
        if failures:
            raise SyncFailed(failures)
        transfer_s = t4 - self._started
        return SyncReport(
            role="receiver",
            rank=g.rank,
            sync_id=h.sync_id,
            tensors=len(h.entries),
            payload_bytes=h.payload_bytes,
            wire_bytes=h.total_bytes,
            buckets=len(h.bucket_sizes),
            header_s=self._header_s,
            vote_s=self._vote_s,
            transfer_s=transfer_s,
            work_s=self._work_s,
            wait_s=self._wait_s,
            commit_s=t5 - t4,
            total_s=self._header_s + self._vote_s + transfer_s + (t5 - t4),
            peak_buffer_bytes=self._peak,
        )

    def __enter__(self) -> IncomingSync:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._finished:
            return
        if e is None:
            self.finish(True)
        elif not isinstance(e, BroadcastError):
            # SyncFailed is expected (our own failure vote); the body's exception propagates.
            with contextlib.suppress(SyncFailed):
                self.finish(False, f"consumer raised {type(e).__name__}: {e}")


def view_bucket(header: SyncHeader) -> list[int | None]:
    """Per manifest entry: the bucket whose buffer its yielded tensor views, or None when it is a staging
    tensor the consumer owns (entries split over buckets). A view of bucket b stays valid until the
    consumer asks for a tensor of bucket b+2."""
    return [e.pieces[0].bucket if len(e.pieces) == 1 else None for e in header.entries]
