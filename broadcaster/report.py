"""What one sync cost on one rank: bytes, buckets, per-phase seconds, throughput, buffer memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SyncReport:
    """Phases: `header_s` (header exchange, incl. a receiver's wait for it), `vote_s` (accept vote),
    `transfer_s` (all buckets), `commit_s` (checksums + commit vote). Within transfer, `work_s` is time
    producing+packing (sender) or in the consumer (receiver) and `wait_s` time blocked on the wire."""

    role: Literal["sender", "receiver"]
    rank: int
    sync_id: str
    tensors: int
    payload_bytes: int
    wire_bytes: int
    buckets: int
    header_s: float
    vote_s: float
    transfer_s: float
    work_s: float
    wait_s: float
    commit_s: float
    total_s: float
    peak_buffer_bytes: int

    @property
    def gbytes_per_s(self) -> float:
        """Payload throughput over the transfer phase, in GB/s (1e9 bytes)."""
        return self.payload_bytes / self.transfer_s / 1e9 if self.transfer_s > 0 else 0.0
