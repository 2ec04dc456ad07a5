"""What one `/update_weights` call did, as seen by the server's HTTP layer, and its one log line.

`rpc.server.routes` builds a `SyncEvent` after every `/update_weights` (success or failure) and hands it to
the router's observers: `log_sync_event` (always) and, inside vLLM, the Prometheus metrics
(`inference_worker.metrics`). Outcomes: `ok`, `refused` (a receiver refused the trainer's header: no
data moved), `timed_out` (a deadline passed), `torn` (this sync failed after loading began and left the
model half-updated) and `error` (anything else: not initialised, bad request, a failed sync).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from configs.api import SyncTimings

Outcome = Literal["ok", "refused", "timed_out", "torn", "error"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "refused", "timed_out", "torn", "error")

# The phases of `SyncTimings`, under the names the metrics and logs use: waiting for the trainer's
# header, waiting for buckets on the wire, loading into the model, the commit vote (checksums).
PHASES: dict[str, str] = {"wait": "wait_s", "receive": "receive_s", "load": "load_s", "verify": "commit_s"}

logger = logging.getLogger("layercast.server")


@dataclass(frozen=True)
class SyncEvent:
    """One `/update_weights` call: its ids, outcome, sizes and timings (`None` when it failed)."""

    sync_id: str
    weights_version: int
    outcome: Outcome
    seconds: float
    bytes_received: int = 0
    num_tensors: int = 0
    load_path: str | None = None
    timings: SyncTimings | None = None
    error: str | None = None

    @property
    def mbytes_per_s(self) -> float:
        total = self.timings.total_s if self.timings else self.seconds
        return self.bytes_received / total / 1e6 if total > 0 else 0.0


SyncObserver = Callable[[SyncEvent], None]


def format_sync_event(event: SyncEvent) -> str:
    """`sync ID vN ok: B bytes, T tensors, path P; wait/receive/load/verify/total ms; X MB/s`, or
    `sync ID vN OUTCOME after S s: the error`."""
    head = f"sync {event.sync_id} v{event.weights_version} {event.outcome}"
    if event.outcome != "ok" or event.timings is None:
        return f"{head} after {event.seconds:.2f} s: {event.error or 'no detail'}"
    t = event.timings
    phases = ", ".join(f"{name} {getattr(t, field) * 1e3:.1f}" for name, field in PHASES.items())
    return (
        f"{head}: {event.bytes_received:,} bytes, {event.num_tensors} tensors, path {event.load_path}; "
        f"{phases}, total {t.total_s * 1e3:.1f} ms; {event.mbytes_per_s:.1f} MB/s"
    )


def log_sync_event(event: SyncEvent) -> None:
    """One INFO line per successful sync, one WARNING line per failed one (never a token: none is here)."""
    level = logging.INFO if event.outcome == "ok" else logging.WARNING
    logger.log(level, "%s", format_sync_event(event))
