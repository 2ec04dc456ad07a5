"""The small control messages of a sync: the header (ids + cached manifest) and the all-rank votes.

Header on the wire: an int64 pair (ids length, manifest length), then one uint8 payload holding the ids
JSON (protocol version, sync id, weights version) followed by the manifest JSON (scheme, layout, buckets,
entries). The manifest is the same from one RL step to the next, so both sides keep the last one per
group: the sender re-uses its serialised bytes, a receiver whose bytes are identical re-uses the parsed,
layout-checked header and bucket plan (parsing ~650 entries costs milliseconds, comparing bytes does not).

Announcement: before its header, the sender writes the sync's id under the store key of the sync's
number (`announce`), and a sender that gives up on a sync before its header writes the reason there
(`cancel`). A receiver can thus wait for "the trainer has started this sync" with plain store reads
(`announcement`), with no collective posted: an armed server keeps generating until the trainer comes.

Invariant: a vote ends with the same verdict on every rank. Each failing rank writes its reason under a
sync-specific store key BEFORE the all_reduce of the per-rank flag vector, so after the all_reduce every
rank knows exactly which ranks failed and can read why.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pydantic import ValidationError

from broadcaster.errors import BroadcastError, PeerLost
from broadcaster.framing import check_layout, pieces_by_bucket
from broadcaster.group import Group
from configs.wire import PROTOCOL_VERSION, SyncHeader, TensorPiece

_IDS = frozenset({"protocol_version", "sync_id", "weights_version"})
BucketPlan = list[list[tuple[int, TensorPiece]]]


@dataclass
class _Cached:
    manifest: bytes
    header: SyncHeader
    plan: BucketPlan
    layout_problem: str | None


class HeaderCache:
    """The last manifest a group carried (one per group, on each side)."""

    def __init__(self) -> None:
        self.last: _Cached | None = None
        self.hits = 0

    def encode(self, header: SyncHeader) -> tuple[bytes, bytes]:
        """(ids JSON, manifest JSON) of `header`; the manifest bytes are re-used while the header's
        manifest is the same objects as last time (frozen models: identity means equality)."""
        ids = json.dumps({k: getattr(header, k) for k in sorted(_IDS)}).encode()
        last = self.last
        if last is not None and _same_manifest(last.header, header):
            self.hits += 1
            return ids, last.manifest
        manifest = header.model_dump_json(exclude=set(_IDS)).encode()
        self.last = _Cached(manifest, header, pieces_by_bucket(header), None)
        return ids, manifest

    def decode(self, ids_raw: bytes, manifest_raw: bytes, max_bucket_size: int | None) -> SyncHeader | str:
        """The header, or why it is unusable (the receiver refuses with that reason)."""
        try:
            ids = json.loads(ids_raw)
            version = ids["protocol_version"]
        except (ValueError, TypeError, KeyError) as e:
            return f"unreadable header ids: {e}"
        if version != PROTOCOL_VERSION:
            return f"protocol version {version}, this receiver speaks {PROTOCOL_VERSION}"
        last = self.last
        if last is not None and last.manifest == manifest_raw:
            self.hits += 1
            try:
                header = last.header.model_copy(
                    update={"sync_id": str(ids["sync_id"]), "weights_version": int(ids["weights_version"])}
                )
            except (KeyError, TypeError, ValueError) as e:
                return f"unreadable header ids: {e}"
            return last.layout_problem or header
        try:
            header = SyncHeader.model_validate({**json.loads(manifest_raw), **ids})
        except (ValidationError, ValueError, TypeError) as e:
            return f"unreadable header: {e}"
        problem = check_layout(header, max_bucket_size)
        self.last = _Cached(manifest_raw, header, [] if problem else pieces_by_bucket(header), problem)
        return problem or header

    def plan(self, header: SyncHeader) -> BucketPlan:
        """Each bucket's (entry index, piece) pairs for `header` (cached for the cached manifest)."""
        last = self.last
        if last is not None and last.header.entries is header.entries and not last.layout_problem:
            return last.plan
        return pieces_by_bucket(header)


def _same_manifest(a: SyncHeader, b: SyncHeader) -> bool:
    return (
        a.entries is b.entries
        and a.bucket_sizes == b.bucket_sizes
        and a.scheme == b.scheme
        and a.layout == b.layout
        and a.checksum == b.checksum
    )


_CACHES: weakref.WeakKeyDictionary[Group, HeaderCache] = weakref.WeakKeyDictionary()


def header_cache(group: Group) -> HeaderCache:
    """The group's header cache (created on first use; gone with the group)."""
    cache = _CACHES.get(group)
    if cache is None:
        cache = _CACHES[group] = HeaderCache()
    return cache


def send_header(group: Group, header: SyncHeader, timeout_s: float) -> None:
    ids, manifest = header_cache(group).encode(header)
    lengths = torch.tensor([len(ids), len(manifest)], dtype=torch.int64, device=group.device)
    payload = torch.frombuffer(bytearray(ids + manifest), dtype=torch.uint8).to(group.device)
    sent_len = group.broadcast(lengths)
    sent = group.broadcast(payload)
    group.wait(sent_len, timeout_s, "the header length broadcast")
    group.wait(sent, timeout_s, "the header broadcast")


def receive_header(group: Group, timeout_s: float, max_bucket_size: int | None = None) -> SyncHeader | str:
    """The sender's header, or why it cannot be used (the caller refuses with that reason)."""
    lengths = torch.zeros(2, dtype=torch.int64, device=group.device)
    group.wait(group.broadcast(lengths), timeout_s, "the next sync header (length)")
    n_ids, n_manifest = (int(x) for x in lengths.tolist())
    payload = torch.empty(n_ids + n_manifest, dtype=torch.uint8, device=group.device)
    group.wait(group.broadcast(payload), timeout_s, "the sync header")
    raw = payload.cpu().numpy().tobytes()
    return header_cache(group).decode(raw[:n_ids], raw[n_ids:], max_bucket_size)


@dataclass(frozen=True)
class Announcement:
    """What the sender said about the group's next sync: its id, or why it was cancelled."""

    sync_id: str
    cancelled: str | None = None


def _announce_key(seq: int) -> str:
    return f"sync/{seq}/announced"


def announce(group: Group, seq: int, sync_id: str) -> None:
    """Sender: sync number `seq` (from `group.next_seq()`) starts now with `sync_id`."""
    group.store.set(_announce_key(seq), json.dumps({"sync_id": sync_id}))


def cancel(group: Group, sync_id: str, reason: str) -> None:
    """Sender: the group's next sync (`sync_id`) will not come, because `reason`; receivers armed for it
    answer at once instead of waiting for their deadline. The sync number is not consumed."""
    group.store.set(_announce_key(group.peek_seq()), json.dumps({"sync_id": sync_id, "cancelled": reason}))


def announcement(group: Group) -> Announcement | None:
    """Receiver: the sender's word on the group's next sync, or None while it has said nothing. Store
    reads only (bounded by the store's operation timeout); raises `PeerLost` if the group was aborted."""
    group.check_health()
    key = _announce_key(group.peek_seq())
    try:
        if not group.store.check([key]):
            return None
        said = json.loads(group.store.get(key))
    except BroadcastError:
        raise
    except Exception as e:
        raise PeerLost(f"rank {group.rank} could not read the sync announcement at {group.where}: {e}") from e
    return Announcement(str(said["sync_id"]), said.get("cancelled"))


@dataclass
class Vote:
    """A vote in flight (`start_vote`); `finish_vote` waits for it and reads the verdict."""

    seq: int
    phase: str
    flags: torch.Tensor
    work: dist.Work


def start_vote(group: Group, seq: int, phase: str, failed: bool, reason: str) -> Vote:
    """Cast this rank's vote without waiting (the caller may work meanwhile)."""
    if failed:
        group.store.set(f"sync/{seq}/{phase}/{group.rank}", reason or "no reason given")
    flags = torch.zeros(group.world_size, dtype=torch.int32, device=group.device)
    if failed:
        flags[group.rank] = 1
    return Vote(seq, phase, flags, group.all_reduce(flags, dist.ReduceOp.MAX))


def finish_vote(group: Group, vote: Vote, timeout_s: float) -> dict[int, str]:
    """{rank: reason} of every rank that voted failed (empty = unanimous ok)."""
    group.wait(vote.work, timeout_s, f"the {vote.phase} vote of sync {vote.seq}")
    bad = vote.flags.nonzero().flatten().tolist()
    return {r: group.store.get(f"sync/{vote.seq}/{vote.phase}/{r}").decode() for r in bad}


def tally(group: Group, seq: int, phase: str, failed: bool, reason: str, timeout_s: float) -> dict[int, str]:
    """All ranks vote; returns {rank: reason} of every rank that voted `failed` (empty = unanimous ok)."""
    return finish_vote(group, start_vote(group, seq, phase, failed, reason), timeout_s)
