"""layercast's Prometheus metrics, served by vLLM's own `/metrics` route (prometheus_client's registry).

vLLM 0.26 serves the default `prometheus_client.REGISTRY` on `/metrics` from the API server process,
which is where our routes run, so `SyncMetrics.observe` (a `rpc.server.routes` observer) records each
`/update_weights` there. With `--api-server-count > 1` vLLM switches prometheus_client to its
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`): counters, histograms and the `mostrecent` gauges still
aggregate across API processes; the scrape-time gauge (`..._seconds_since_last_successful_sync`)
cannot exist there and is left out (use `time() - layercast_last_successful_sync_timestamp_seconds`).

Metrics:
- `layercast_sync_duration_seconds{phase}` histogram; phases `wait` (for the trainer's header),
  `receive` (for buckets on the wire), `load` (into the model), `verify` (the commit vote and
  checksums), `total`; successful syncs only (a failed one has no complete timings).
- `layercast_sync_received_bytes_total` counter of payload bytes of successful syncs.
- `layercast_weights_version` gauge: the version now served (NaN before the first sync).
- `layercast_syncs_total{outcome}` counter; outcomes `ok`, `refused`, `timed_out`, `torn`, `error`.
- `layercast_last_successful_sync_timestamp_seconds` gauge (Unix time).
- `layercast_seconds_since_last_successful_sync` gauge, computed at scrape time (NaN before the first).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from rpc.server.sync_events import OUTCOMES, PHASES, SyncEvent

DURATION_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)  # fmt: skip


def multiprocess_mode() -> bool:
    """True when prometheus_client aggregates several processes (vLLM with `--api-server-count > 1`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class SyncMetrics:
    """The metrics above, registered in `registry`; `observe(event)` records one `/update_weights`."""

    def __init__(
        self, registry: CollectorRegistry = REGISTRY, clock: Callable[[], float] = time.time
    ) -> None:
        self._clock = clock
        self._last_ok: float | None = None
        self._lock = threading.Lock()
        self.duration = Histogram(
            "layercast_sync_duration_seconds",
            "Seconds per phase of successful weight syncs (wait, receive, load, verify, total)",
            ["phase"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.received_bytes = Counter(
            "layercast_sync_received_bytes", "Payload bytes received by successful syncs", registry=registry
        )
        self.version = Gauge(
            "layercast_weights_version",
            "Weights version this server serves",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.syncs = Counter(
            "layercast_syncs", "Weight syncs (/update_weights calls) by outcome", ["outcome"],
            registry=registry,
        )  # fmt: skip
        self.last_ok_timestamp = Gauge(
            "layercast_last_successful_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.version.set(math.nan)
        for outcome in OUTCOMES:
            self.syncs.labels(outcome=outcome)
        for phase in (*PHASES, "total"):
            self.duration.labels(phase=phase)
        if not multiprocess_mode():
            since = Gauge(
                "layercast_seconds_since_last_successful_sync",
                "Seconds since the last successful sync, at scrape time (NaN before the first)",
                registry=registry,
            )
            since.set_function(self.seconds_since_last_ok)

    def seconds_since_last_ok(self) -> float:
        last = self._last_ok
        return math.nan if last is None else max(0.0, self._clock() - last)

    def observe(self, event: SyncEvent) -> None:
        self.syncs.labels(outcome=event.outcome).inc()
        if event.outcome != "ok" or event.timings is None:
            return
        t = event.timings
        for phase, field in PHASES.items():
            self.duration.labels(phase=phase).observe(getattr(t, field))
        self.duration.labels(phase="total").observe(t.total_s)
        self.received_bytes.inc(event.bytes_received)
        now = self._clock()
        with self._lock:
            self._last_ok = now
        self.version.set(event.weights_version)
        self.last_ok_timestamp.set(now)


_default: SyncMetrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> SyncMetrics:
    """The process's metrics in prometheus_client's default registry (what vLLM serves), made once."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SyncMetrics()
        return _default
