"""The wire between one trainer (rank 0) and many inference workers: rendezvous, framing, buckets,
deadlines, votes. Knows nothing about vLLM or quantization: it moves named tensors."""

from broadcaster.errors import (
    BroadcastError,
    BroadcastTimeout,
    PeerLost,
    RendezvousError,
    SyncFailed,
    SyncRefused,
)
from broadcaster.framing import DEFAULT_BUCKET_SIZE, check_layout, make_header, plan_buckets
from broadcaster.group import Group
from broadcaster.receiver import IncomingSync, Receiver
from broadcaster.report import SyncReport
from broadcaster.sender import Sender
from broadcaster.timeouts import Timeouts

__all__ = [
    "DEFAULT_BUCKET_SIZE",
    "BroadcastError",
    "BroadcastTimeout",
    "Group",
    "IncomingSync",
    "PeerLost",
    "Receiver",
    "RendezvousError",
    "Sender",
    "SyncFailed",
    "SyncRefused",
    "SyncReport",
    "Timeouts",
    "check_layout",
    "make_header",
    "plan_buckets",
]
