"""The small control messages of a sync: the JSON header (length first) and the all-rank votes.

Invariant: a vote ends with the same verdict on every rank. Each failing rank writes its reason under a
sync-specific store key BEFORE the all_reduce of the per-rank flag vector, so after the all_reduce every
rank knows exactly which ranks failed and can read why.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import ValidationError

from broadcaster.group import Group
from configs.wire import PROTOCOL_VERSION, SyncHeader


def send_header(group: Group, header: SyncHeader, timeout_s: float) -> None:
    data = header.model_dump_json().encode()
    length = torch.tensor([len(data)], dtype=torch.int64, device=group.device)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(group.device)
    sent_len = group.broadcast(length)
    sent = group.broadcast(payload)
    group.wait(sent_len, timeout_s, "the header length broadcast")
    group.wait(sent, timeout_s, "the header broadcast")


def receive_header(group: Group, timeout_s: float) -> SyncHeader | str:
    """The sender's header, or why it cannot be parsed (the caller refuses with that reason)."""
    length = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.wait(group.broadcast(length), timeout_s, "the next sync header (length)")
    payload = torch.empty(int(length.item()), dtype=torch.uint8, device=group.device)
    group.wait(group.broadcast(payload), timeout_s, "the sync header")
    raw = payload.cpu().numpy().tobytes()
    try:
        header = SyncHeader.model_validate_json(raw)
    except ValidationError as e:
        return f"unreadable header: {e}"
    if header.protocol_version != PROTOCOL_VERSION:
        return f"protocol version {header.protocol_version}, this receiver speaks {PROTOCOL_VERSION}"
    return header


def tally(group: Group, seq: int, phase: str, failed: bool, reason: str, timeout_s: float) -> dict[int, str]:
    """All ranks vote; returns {rank: reason} of every rank that voted `failed` (empty = unanimous ok)."""
    key = f"sync/{seq}/{phase}/"
    if failed:
        group.store.set(key + str(group.rank), reason or "no reason given")
    flags = torch.zeros(group.world_size, dtype=torch.int32, device=group.device)
    if failed:
        flags[group.rank] = 1
    group.wait(group.all_reduce(flags, dist.ReduceOp.MAX), timeout_s, f"the {phase} vote of sync {seq}")
    bad = flags.nonzero().flatten().tolist()
    return {r: group.store.get(key + str(r)).decode() for r in bad}
