"""layercast's Prometheus metrics and per-sync log lines, on a real `layercast serve` over real HTTP/Gloo.

One server per module; the tests run in file order and each checks the metrics after its syncs against
what the syncs returned (counts by outcome, version, bytes, per-phase histogram counts and sums).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from broadcaster.errors import BroadcastError
from broadcaster.framing import make_header
from broadcaster.sender import Sender
from rpc.tools.launch import ServerProcess
from tests.toy_server import BackgroundPost
from trainer_side.broadcast import PushError, PushReport, WeightBroadcaster
from trainer_side.toy_models import perturb_
from trainer_side.walker import iter_layer_chunks, plan_stream

pytestmark = pytest.mark.slow
TOKEN = "metrics-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PHASES = {
    "wait": "wait_s", "receive": "receive_s", "load": "load_s", "verify": "commit_s", "total": "total_s"
}  # fmt: skip


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """`{(sample name, sorted labels): value}` of every layercast sample on `/metrics`."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("layercast_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def outcomes(m: dict) -> dict[str, float]:
    return {dict(k[1])["outcome"]: v for k, v in m.items() if k[0] == "layercast_syncs_total"}


def phase(m: dict, suffix: str, name: str) -> float:
    return m[(f"layercast_sync_duration_seconds_{suffix}", (("phase", name),))]


class Syncs:
    """What the tests did so far (what the metrics must add up to)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("ok", "refused", "timed_out", "torn", "error"), 0)
        self.reports: list[PushReport] = []


@pytest.fixture(scope="module")
def done() -> Syncs:
    return Syncs()


def check_counts(url: str, done: Syncs) -> dict:
    m = scrape(url)
    assert outcomes(m) == {k: float(v) for k, v in done.counts.items()}
    return m


def test_before_any_sync(server: ServerProcess, done: Syncs) -> None:
    m = check_counts(server.url, done)
    assert math.isnan(m[("layercast_weights_version", ())])
    assert math.isnan(m[("layercast_seconds_since_last_successful_sync", ())])
    assert m[("layercast_sync_received_bytes_total", ())] == 0
    assert phase(m, "count", "load") == 0
    early = {"sync_id": "early", "weights_version": 1}
    r = httpx.post(server.url + "/update_weights", json=early, headers=AUTH)
    assert r.status_code == 503
    done.counts["error"] += 1
    check_counts(server.url, done)


def test_successful_syncs(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module, done: Syncs,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    bc.init()
    with caplog.at_level(logging.INFO, logger="layercast.trainer"):
        for version in (1, 2):
            perturb_(trainer_model, version)
            done.reports.append(bc.push(trainer_model, version, sync_id=f"metrics-v{version}"))
            done.counts["ok"] += 1
    m = check_counts(server.url, done)
    answers = [r.servers[server.url] for r in done.reports]
    assert m[("layercast_weights_version", ())] == 2
    assert m[("layercast_sync_received_bytes_total", ())] == sum(a.bytes_received for a in answers)
    assert sum(a.bytes_received for a in answers) == sum(r.bytes_sent for r in done.reports) > 0
    for name, field in PHASES.items():
        assert phase(m, "count", name) == 2
        assert phase(m, "sum", name) == pytest.approx(sum(getattr(a.timings, field) for a in answers))
    since = m[("layercast_seconds_since_last_successful_sync", ())]
    stamp = m[("layercast_last_successful_sync_timestamp_seconds", ())]
    assert 0 <= since < 60 and abs(time.time() - stamp - since) < 5
    # The trainer logged one line per push: sync id, version, bytes, phases, throughput, servers' phases.
    lines = [r.getMessage() for r in caplog.records if r.name == "layercast.trainer"]
    assert len(lines) == 2
    for line, report in zip(lines, done.reports, strict=True):
        assert f"sync {report.sync_id} v{report.weights_version}" in line
        assert f"{report.bytes_sent / 1e6:.1f} MB" in line and "GB/s" in line
        for word in ("quantize", "send", "commit", "servers (1) wait", "receive", "load", "verify"):
            assert word in line
        assert TOKEN not in line


def test_refused_sync(server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module,
                      done: Syncs, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    body = {"sync_id": "server-side", "weights_version": 9}
    armed = BackgroundPost(server.url + "/update_weights", body, TOKEN)
    with (
        caplog.at_level(logging.INFO, logger="layercast.trainer"),
        pytest.raises(PushError, match="server-side"),
    ):
        bc.push(trainer_model, 9, sync_id="trainer-side", arm=False)
    assert armed.response().status_code == 409
    done.counts["refused"] += 1
    m = check_counts(server.url, done)
    assert m[("layercast_weights_version", ())] == 2
    assert phase(m, "count", "load") == 2
    (line,) = [r for r in caplog.records if r.name == "layercast.trainer"]
    assert line.levelname == "WARNING"
    assert "sync trainer-side failed" in line.getMessage() and "(v9, after" in line.getMessage()


def test_torn_then_healed(server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module,
                          done: Syncs) -> None:  # fmt: skip
    bc._ensure_group()
    assert bc.group is not None
    header = make_header(
        [(s.name, s.dtype, s.shape) for s in plan_stream(trainer_model, bc.scheme)],
        sync_id="doomed", weights_version=3, scheme=bc.scheme, bucket_size=64 * 1024,
    )  # fmt: skip

    def dies_halfway() -> Iterator[tuple[str, torch.Tensor]]:
        tensors = [t for c in iter_layer_chunks(trainer_model, bc.scheme) for t in c.tensors]
        yield from tensors[: len(tensors) // 2]
        raise RuntimeError("trainer crashed while quantizing")

    armed = BackgroundPost(server.url + "/update_weights", {"sync_id": "doomed", "weights_version": 3}, TOKEN)
    with pytest.raises(BroadcastError, match="trainer crashed"):
        Sender(bc.group).send(header, dies_halfway())
    assert armed.response().status_code == 502
    done.counts["torn"] += 1
    check_counts(server.url, done)
    perturb_(trainer_model, 4)
    done.reports.append(bc.push(trainer_model, 4, sync_id="metrics-v4"))
    done.counts["ok"] += 1
    m = check_counts(server.url, done)
    assert m[("layercast_weights_version", ())] == 4
    assert m[("layercast_sync_received_bytes_total", ())] == sum(r.bytes_sent for r in done.reports)


def test_timed_out_sync(server: ServerProcess, done: Syncs) -> None:
    r = httpx.post(server.url + "/update_weights", headers=AUTH, timeout=60,
                   json={"sync_id": "lonely", "weights_version": 5, "timeout_s": 1})  # fmt: skip
    assert r.status_code == 504
    done.counts["timed_out"] += 1
    m = check_counts(server.url, done)
    assert m[("layercast_weights_version", ())] == 4
    assert phase(m, "count", "total") == done.counts["ok"]


def test_server_logged_one_line_per_sync_without_the_token(server: ServerProcess, done: Syncs) -> None:
    log = server.log_path.read_text(errors="replace")
    assert TOKEN not in log
    lines = [ln for ln in log.splitlines() if "[layercast.server]" in ln]
    assert len(lines) == sum(done.counts.values()), lines
    for report in done.reports:
        (line,) = [ln for ln in lines if f"sync {report.sync_id} v{report.weights_version} ok:" in ln]
        assert " INFO " in line
        assert f"{report.bytes_sent:,} bytes" in line and "MB/s" in line
        for word in ("wait", "receive", "load", "verify", "total"):
            assert word in line
    (timed_out,) = [ln for ln in lines if "sync lonely v5 timed_out" in ln]
    assert " WARNING " in timed_out and "within 1.0 s" in timed_out and "header" in timed_out
    (refused,) = [ln for ln in lines if "sync server-side v9 refused" in ln]
    assert "trainer-side" in refused
    (torn,) = [ln for ln in lines if "sync doomed v3 torn" in ln]
    assert "trainer crashed" in torn
