"""Rank 0's side of a sync: header, accept vote, double-buffered bucket stream, commit vote.

The accept vote is cast right after the header and waited for only once bucket 0 is packed, so producing
the first bucket (walking, quantizing) overlaps the receivers' arrival and header checks; nothing is
broadcast before every rank accepted.

Invariants:
- the buckets are filled in order by a `BucketSource`: either the sender's packer, which pulls tensors
  lazily from an iterable in manifest order and checks each against its manifest entry (name, dtype,
  shape) before a byte of it is packed, or a producer that writes its tensors in place
  (`trainer_side.bucket_writer`);
- at most two bucket buffers exist; bucket k+1 is packed while bucket k's broadcast is in flight, and a
  buffer is reused only after its broadcast completed (waited with a deadline);
- if the producer fails or mismatches mid-stream, every remaining bucket is still broadcast (zero-filled)
  and the failure is voted at the commit, so receivers never wait on data that will not come.
On CUDA, ProcessGroupNCCL runs each broadcast on its own comm stream, ordered after the packing copies on
the current stream by an event at enqueue; the host only polls completion (for the deadline) before
reusing a buffer two buckets later, so packing and the wire overlap without other host syncs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch

from broadcaster.checksum import bucket_checksum
from broadcaster.control import (
    BucketPlan,
    announce,
    finish_vote,
    header_cache,
    send_header,
    start_vote,
    tally,
)
from broadcaster.errors import SyncFailed, SyncRefused
from broadcaster.group import Group
from broadcaster.report import SyncReport
from broadcaster.timeouts import Timeouts
from configs.wire import ManifestEntry, SyncHeader


class _ProducerError(Exception):
    """The producer stream cannot continue; the message becomes the sender's commit vote reason."""


def _next_tensor(
    it: Iterator[tuple[str, torch.Tensor]], entry: ManifestEntry, index: int, total: int
) -> torch.Tensor:
    try:
        name, tensor = next(it)
    except StopIteration:
        raise _ProducerError(
            f"producer stopped after {index} of {total} tensors; expected {entry.name}"
        ) from None
    got = (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
    if got != (entry.name, entry.dtype, entry.shape):
        raise _ProducerError(
            f"tensor #{index} does not match the manifest: expected {entry.name} {entry.dtype} "
            f"{list(entry.shape)}, producer gave {got[0]} {got[1]} {list(got[2])}"
        )
    return tensor


def _pack(dst: torch.Tensor, tensor: torch.Tensor, entry: ManifestEntry, offset: int) -> None:
    """Copy bytes [offset, offset + dst.numel()) of `tensor` into the uint8 slice `dst`."""
    if dst.numel() == 0:
        return
    if tensor.is_contiguous():
        dst.copy_(tensor.reshape(-1).view(torch.uint8)[offset : offset + dst.numel()])
    elif len(entry.pieces) == 1:
        dst.view(tensor.dtype).view(tensor.shape).copy_(tensor)  # strided copy, no temporary
    else:
        dst.copy_(tensor.contiguous().reshape(-1).view(torch.uint8)[offset : offset + dst.numel()])


@runtime_checkable
class BucketSource(Protocol):
    """Writes the stream bucket by bucket: `fill(k, buf)` for k = 0, 1, ... in order (`buf` holds
    `bucket_sizes[k]` bytes), then `finish()`, which returns why the stream is bad (the sender votes
    that reason at the commit) or None. A producer that makes tensors in place in the buckets is one;
    an iterable of `(name, tensor)` is packed by the sender itself."""

    def fill(self, k: int, buf: torch.Tensor) -> None: ...

    def finish(self) -> str | None: ...


class TensorPacker:
    """The `BucketSource` of an iterator of `(name, tensor)` in manifest order: each tensor is checked
    against its manifest entry, then its bytes are copied into the buckets its pieces name."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]], header: SyncHeader, plan: BucketPlan) -> None:
        self.it, self.entries, self.plan = it, header.entries, plan
        self.current: torch.Tensor | None = None
        self.produced = 0

    def fill(self, k: int, buf: torch.Tensor) -> None:
        entries = self.entries
        try:
            for index, piece in self.plan[k]:
                entry = entries[index]
                if piece.tensor_offset == 0:
                    self.current = _next_tensor(self.it, entry, self.produced, len(entries))
                    self.produced += 1
                assert self.current is not None
                dst = buf[piece.bucket_offset : piece.bucket_offset + piece.nbytes]
                _pack(dst, self.current, entry, piece.tensor_offset)
                if piece.tensor_offset + piece.nbytes == entry.nbytes:
                    self.current = None
        except BaseException:
            self.current = None
            raise

    def finish(self) -> str | None:
        extra = next(self.it, None)
        if extra is not None:
            return f"producer yielded more than the manifest's {len(self.entries)} tensors: {extra[0]}"
        return None

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if callable(close):
            close()


class Sender:
    """Broadcasts syncs from rank 0 of `group`."""

    def __init__(self, group: Group, *, timeouts: Timeouts | None = None) -> None:
        if group.rank != 0:
            raise ValueError(f"the sender is rank 0, this group's rank is {group.rank}")
        self.group = group
        self.timeouts = timeouts or Timeouts()

    def send(
        self, header: SyncHeader, tensors: Iterable[tuple[str, torch.Tensor]] | BucketSource
    ) -> SyncReport:
        """Run one sync of `tensors` (in manifest order, or a `BucketSource` writing the buckets);
        returns the report or raises `SyncRefused`, `SyncFailed` or another `BroadcastError`
        (timeout / lost peer: the group is then aborted and must be replaced)."""
        g, to = self.group, self.timeouts
        g.check_health()
        seq = g.next_seq()
        t0 = time.monotonic()
        announce(g, seq, header.sync_id)
        send_header(g, header, to.header_s)
        t1 = time.monotonic()
        vote = start_vote(g, seq, "accept", False, "")
        voted: list[float] = []

        def accepted() -> None:
            # Runs once the first bucket is packed: producing it overlapped the receivers' checks.
            start = time.monotonic()
            refusals = finish_vote(g, vote, to.vote_s)
            voted.append(time.monotonic() - start)
            if refusals:
                raise SyncRefused(refusals)

        sums: list[torch.Tensor] = []
        if isinstance(tensors, BucketSource):
            source: BucketSource = tensors
        else:
            source = TensorPacker(iter(tensors), header, header_cache(g).plan(header))
        try:
            error, work_s, wait_s, peak = self._stream(header, source, sums, accepted)
        except SyncRefused:
            _close(source)
            raise
        t3 = time.monotonic()
        if header.checksum and sums:
            g.wait(g.broadcast(torch.stack(sums)), to.commit_s, f"the checksum broadcast of sync {seq}")
        failures = tally(g, seq, "commit", error is not None, str(error or ""), to.commit_s)
        t4 = time.monotonic()
        if failures:
            raise SyncFailed(failures) from error
        return SyncReport(
            role="sender",
            rank=g.rank,
            sync_id=header.sync_id,
            tensors=len(header.entries),
            payload_bytes=header.payload_bytes,
            wire_bytes=header.total_bytes,
            buckets=len(header.bucket_sizes),
            header_s=t1 - t0,
            vote_s=voted[0] if voted else 0.0,
            transfer_s=t3 - t1 - (voted[0] if voted else 0.0),
            work_s=work_s,
            wait_s=wait_s,
            commit_s=t4 - t3,
            total_s=t4 - t0,
            peak_buffer_bytes=peak,
        )

    def _stream(
        self,
        header: SyncHeader,
        source: BucketSource,
        sums: list[torch.Tensor],
        accepted: Callable[[], None],
    ) -> tuple[Exception | None, float, float, int]:
        """Broadcast every bucket; returns (producer error or None, work s, wait s, peak buffer bytes).
        `accepted()` runs after bucket 0 is filled and before anything is broadcast (it raises
        `SyncRefused` on a refusal: nothing was sent, the group stays usable)."""
        g, sizes = self.group, header.bucket_sizes
        bufs = g.bucket_buffers(header.max_bucket_size, min(2, len(sizes)))
        in_flight: list[object | None] = [None, None]
        zeroed = [False, False]
        error: Exception | None = None
        work_s, wait_s = 0.0, 0.0
        if not sizes:
            accepted()
        try:
            for k, size in enumerate(sizes):
                slot = k % 2
                if in_flight[slot] is not None:
                    wait_s += g.wait(in_flight[slot], self.timeouts.bucket_s, f"bucket {k - 2} to go out")  # type: ignore[arg-type]
                buf = bufs[slot][:size]
                start = time.monotonic()
                if error is None:
                    try:
                        source.fill(k, buf)
                    except Exception as e:
                        error = e
                if error is not None and not zeroed[slot]:
                    bufs[slot].zero_()
                    zeroed[slot] = True
                if header.checksum:
                    sums.append(bucket_checksum(buf))
                work_s += time.monotonic() - start
                if k == 0:
                    accepted()
                in_flight[slot] = g.broadcast(buf)
            for work in in_flight:
                if work is not None:
                    wait_s += g.wait(work, self.timeouts.bucket_s, "the last buckets to go out")  # type: ignore[arg-type]
            if error is None:
                try:
                    reason = source.finish()
                except Exception as e:
                    error = e
                else:
                    error = _ProducerError(reason) if reason else None
        except SyncRefused:
            raise  # refused before any bucket went out: the group stays in lockstep
        except BaseException:
            g.abort("sender interrupted mid-stream")
            raise
        finally:
            if error is not None:
                _close(source)
        if error is not None and not isinstance(error, _ProducerError):
            wrapped = _ProducerError(f"producer raised {type(error).__name__}: {error}")
            wrapped.__cause__ = error
            error = wrapped
        return error, work_s, wait_s, len(bufs) * header.max_bucket_size


def _close(source: BucketSource) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()
