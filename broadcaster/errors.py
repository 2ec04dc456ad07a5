"""The exceptions the broadcaster raises; every one says which rank saw what.

Invariant: a `BroadcastError` raised on one rank during a sync is matched by a `BroadcastError` on every
other rank of the group (same verdict for votes; timeout or lost peer for a dead group), never a hang.
"""

from __future__ import annotations

# How a server's abort reason starts when another trainer took the server over (`takeover=true`): the
# first trainer's next call fails at once with that reason instead of silently re-joining.
TAKEN_OVER = "taken over by trainer"


class BroadcastError(RuntimeError):
    """Base of everything the broadcaster raises about the group or a sync."""


class RendezvousError(BroadcastError):
    """The group could not be formed: wrong world size, duplicate rank, or a rank never joined."""


class BroadcastTimeout(BroadcastError):
    """A blocking step passed its deadline; the group was aborted and must be replaced."""


class RendezvousTimeout(RendezvousError, BroadcastTimeout):
    """The rendezvous passed its deadline (rank 0 never hosted the store, or ranks never joined)."""


class PeerLost(BroadcastError):
    """The backend failed (a peer died or the group was aborted elsewhere); the group must be replaced."""


class _VoteError(BroadcastError):
    def __init__(self, what: str, reasons: dict[int, str]) -> None:
        self.reasons = dict(sorted(reasons.items()))
        detail = "; ".join(f"rank {r}: {why}" for r, why in self.reasons.items())
        super().__init__(f"{what} by rank(s) {list(self.reasons)}: {detail}")


class SyncRefused(_VoteError):
    """At least one receiver refused the header; no data moved and the group stays usable."""

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__("sync refused", reasons)


class SyncFailed(_VoteError):
    """The commit vote failed (sender stream broke, a consumer failed, or a checksum mismatched).

    All data was exchanged, so the group stays usable for the next sync.
    """

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__("sync failed", reasons)
