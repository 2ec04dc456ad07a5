"""End to end over real HTTP and Gloo: `layercast serve` (vLLM CPU build) + the trainer's WeightBroadcaster.

One server per module (vLLM start-up costs ~40 s on CPU); tests run in file order and share it.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch

from broadcaster.errors import BroadcastError
from broadcaster.framing import make_header
from broadcaster.sender import Sender
from configs.trainer import BroadcasterConfig
from rpc.tools.demo import PROMPT
from rpc.tools.launch import ServerProcess, free_port
from tests.toy_server import (
    BackgroundPost,
    assert_serves,
    generate,
    model_dir,
    send_dying_sync,
    toy_broadcaster,
)
from trainer_side.broadcast import PushError, WeightBroadcaster
from trainer_side.toy_models import perturb_, toy_config, toy_model
from trainer_side.walker import iter_layer_chunks, plan_stream

pytestmark = pytest.mark.slow
TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_admin_routes_need_the_token(server: ServerProcess) -> None:
    body = {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2, "rank_offset": 1}
    r = httpx.post(server.url + "/init_broadcaster", json=body)
    assert r.status_code == 401 and "bearer" in r.text.lower()
    r = httpx.post(server.url + "/init_broadcaster", json=body, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert TOKEN not in r.text
    r = httpx.get(server.url + "/weights")
    assert r.status_code == 200 and r.json()["state"] == "uninitialized" and r.json()["num_workers"] == 1


def test_update_before_init_is_503(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/update_weights", json={"sync_id": "s0", "weights_version": 1}, headers=AUTH)
    assert r.status_code == 503 and "/init_broadcaster" in r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"master_address": "h", "master_port": "x", "world_size": 2, "rank_offset": 1}, "master_port"),
        ({"master_address": "h", "master_port": 5, "world_size": 2, "rank_offset": 2}, "rank_offset"),
        ({"master_address": "h", "master_port": 5, "world_size": 2}, "rank_offset"),
        (
            {"master_address": "h", "master_port": 5, "world_size": 2, "rank_offset": 1, "load_path": "x"},
            "load_path",
        ),
        ({"master_address": "h", "master_port": 5, "world_size": 2, "rank_offset": 1, "bogus": 1}, "bogus"),
    ],
)
def test_malformed_init_names_the_field(server: ServerProcess, body: dict, field: str) -> None:
    r = httpx.post(server.url + "/init_broadcaster", json=body, headers=AUTH)
    assert 400 <= r.status_code < 500 and field in r.text


def test_bad_json_and_unknown_route(server: ServerProcess) -> None:
    r = httpx.post(
        server.url + "/update_weights",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert 400 <= r.status_code < 500
    assert httpx.get(server.url + "/no_such_route").status_code == 404


def test_sync_updates_generation(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    inits = bc.init()
    assert inits[server.url].ranks == [1] and inits[server.url].load_path in ("layerwise", "checkpoint")
    for version in (1, 2):
        perturb_(trainer_model, version)
        report = bc.push(trainer_model, version)
        assert report.servers[server.url].weights_version == version
        assert report.bytes_sent == sum(p.numel() * p.element_size() for p in trainer_model.parameters())
        status = httpx.get(server.url + "/weights").json()
        assert status["weights_version"] == version and status["state"] == "ready"
        assert_serves(server.url, trainer_model)


def test_mismatched_sync_id_is_refused_and_nothing_changes(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    before = generate(server.url)
    changed = toy_model(toy_config("qwen3", torch.float32), seed=7)
    specs = plan_stream(changed, bc.scheme)
    header = make_header(
        [(s.name, s.dtype, s.shape) for s in specs],
        sync_id="trainer-side",
        weights_version=9,
        scheme=bc.scheme,
        bucket_size=256 * 1024,
    )
    armed = BackgroundPost(
        server.url + "/update_weights", {"sync_id": "server-side", "weights_version": 9}, TOKEN
    )
    assert bc.group is not None
    with pytest.raises(BroadcastError, match="server-side"):
        Sender(bc.group).send(header, (t for c in iter_layer_chunks(changed, bc.scheme) for t in c.tensors))
    answer = armed.response()
    assert answer.status_code == 409 and "trainer-side" in answer.text
    status = httpx.get(server.url + "/weights").json()
    assert status["weights_version"] == 2 and status["state"] == "ready"
    assert generate(server.url) == before


def test_second_concurrent_update_is_409_then_recovers(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    # Nobody sends for this one: it times out waiting for the header.
    lonely = {"sync_id": "lonely", "weights_version": 3, "timeout_s": 3}
    first = BackgroundPost(server.url + "/update_weights", lonely, TOKEN)
    time.sleep(0.5)
    r = httpx.post(
        server.url + "/update_weights", headers=AUTH, json={"sync_id": "second", "weights_version": 3}
    )
    assert r.status_code == 409 and "in progress" in r.text
    answer = first.response()
    assert answer.status_code == 504 and "header" in answer.text
    assert httpx.get(server.url + "/weights").json()["state"] == "ready"  # nothing was loaded
    # The group was aborted by the timeout: the next push re-joins everyone and succeeds.
    perturb_(trainer_model, 3)
    report = bc.push(trainer_model, 3)
    assert report.servers[server.url].weights_version == 3
    assert_serves(server.url, trainer_model)


def test_push_without_servers_listening_fails_clearly(tmp_path: Path, server: ServerProcess) -> None:
    b = WeightBroadcaster(
        BroadcasterConfig(
            servers=[f"http://127.0.0.1:{free_port()}"],
            inference_config=model_dir(server),
            master_port=free_port(),
            http_timeout_s=2,
        )
    )
    with pytest.raises(PushError, match="cannot reach"):
        b.init()


def test_trainer_failing_mid_sync_leaves_server_refusing_until_a_full_sync(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    bc._ensure_group()
    answer = send_dying_sync(server.url, bc, trainer_model, "doomed", 4, TOKEN)
    assert answer.status_code == 502 and "trainer crashed" in answer.text
    status = httpx.get(server.url + "/weights").json()
    assert status["state"] == "torn" and status["weights_version"] == 3
    r = httpx.post(server.url + "/v1/completions", json={"model": "toy", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 503 and "torn" in r.text
    # A complete sync heals the server, in the same processes.
    perturb_(trainer_model, 5)
    bc.push(trainer_model, 5)
    assert httpx.get(server.url + "/weights").json()["state"] == "ready"
    assert_serves(server.url, trainer_model)


def test_a_server_refusing_the_sync_over_http_fails_the_push_at_once(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    """The server answers 409 (an older version) without joining the sync: the trainer must not sit in
    the accept vote until its step deadline (30 s here), and the next push re-forms the group and lands."""
    started = time.monotonic()
    with pytest.raises(PushError, match="older than the weights_version 5"):
        bc.push(trainer_model, 2)
    assert time.monotonic() - started < 10, "the trainer waited for a server that had refused the sync"
    perturb_(trainer_model, 6)
    bc.push(trainer_model, 6)
    assert httpx.get(server.url + "/weights").json()["weights_version"] == 6
    assert_serves(server.url, trainer_model)


def test_server_refusing_init_ends_the_rendezvous_at_once(server: ServerProcess) -> None:
    # This server runs vLLM's default CPU kernels (weights in oneDNN): the checkpoint path is refused.
    refused = toy_broadcaster(server, TOKEN, load_path="checkpoint", rendezvous_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(PushError, match="checkpoint path refused"):
        refused.init()
    assert time.monotonic() - started < 15, "the trainer waited for a rank that had refused to join"
    refused.close()
