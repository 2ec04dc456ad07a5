"""Fault suite, one server: bad bodies, config mismatches, retries, concurrency, secrets, and a load test.

Real `layercast serve` (vLLM CPU build) over real HTTP and Gloo; one server for the module (tests run in
file order and share it). Every failure case asserts: a clear error naming the cause, within its
deadline; the server still on its previous complete weights (same version, same generation) or refusing
generation with 503 + reason; and a normal sync succeeding afterwards in the same processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
import torch

from broadcaster.errors import BroadcastError, RendezvousError, SyncRefused
from broadcaster.framing import make_header
from broadcaster.group import Group
from broadcaster.sender import Sender
from broadcaster.timeouts import Timeouts
from configs.quant import QuantScheme
from inference_worker.sync_worker import MAX_BUCKET_ENV
from rpc.client.orchestrator import SyncOrchestrator
from rpc.server.middleware import MAX_ADMIN_BODY_BYTES, VERSION_HEADER
from rpc.tools.demo import PROMPT, reference_greedy
from rpc.tools.launch import ServerProcess, free_port
from tests.toy_server import MAX_TOKENS, BackgroundPost, assert_serves, toy_broadcaster
from trainer_side.broadcast import PushError, WeightBroadcaster
from trainer_side.detect import detect_quant_scheme
from trainer_side.toy_models import perturb_, toy_config, toy_model
from trainer_side.walker import iter_layer_chunks, plan_stream

pytestmark = pytest.mark.slow
TOKEN = "fault-suite-token-7f3a9c"
SERVER_MAX_BUCKET = 256 * 1024  # the server's cap on a trainer's bucket (toy_broadcaster sends 256 KiB)
SERVER_ENV = {MAX_BUCKET_ENV: str(SERVER_MAX_BUCKET)}
WRONG_TOKEN = "wrong-token-0b1d2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FP8_CONFIG = {
    "quantization_config": {
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
}


class Completion:
    """One greedy completion of the fixed prompt: status, weights-version tag, tokens, logprobs."""

    def __init__(self, resp: httpx.Response) -> None:
        self.status = resp.status_code
        self.version = resp.headers.get(VERSION_HEADER)
        self.text = resp.text
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        if resp.status_code == 200:
            choice = resp.json()["choices"][0]
            self.tokens = list(choice["token_ids"])
            self.logprobs = [float(x) for x in choice["logprobs"]["token_logprobs"]]


def complete(url: str, client: httpx.Client | None = None) -> Completion:
    body = {
        "model": "toy", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "logprobs": 1, "return_token_ids": True,
    }  # fmt: skip
    post = client.post if client is not None else httpx.post
    return Completion(post(url + "/v1/completions", json=body, timeout=60))


def weights(url: str) -> dict[str, Any]:
    return httpx.get(url + "/weights").json()


def assert_unchanged(url: str, before_status: dict[str, Any], before_gen: Completion) -> None:
    """The server still serves its previous complete weights: same state, version and generation."""
    now = weights(url)
    assert now["state"] == "ready" and now["weights_version"] == before_status["weights_version"], now
    gen = complete(url)
    assert gen.status == 200 and gen.version == before_gen.version
    assert gen.tokens == before_gen.tokens and gen.logprobs == before_gen.logprobs


def normal_sync(bc: WeightBroadcaster, model: torch.nn.Module, url: str, version: int) -> None:
    perturb_(model, version)
    report = bc.push(model, version)
    assert report.servers[url].weights_version == version
    assert weights(url)["state"] == "ready"
    assert complete(url).version == str(version)
    assert_serves(url, model)


class InThread:
    """Run `fn` in a thread; `outcome()` is (result or exception, seconds it took)."""

    def __init__(self, fn: Any) -> None:
        self._out: Any = None
        self._took = 0.0

        def run() -> None:
            t0 = time.monotonic()
            try:
                self._out = fn()
            except BaseException as exc:
                self._out = exc
            self._took = time.monotonic() - t0

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def outcome(self, timeout_s: float = 60) -> tuple[Any, float]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the thread did not finish"
        return self._out, self._took


# ------------------------------------------------------------------ listening sockets, bodies, routes


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_admin_http_listens_on_loopback_only(server: ServerProcess) -> None:
    # vLLM's own worker keeps a torch TCPStore for its internal process group, which torch binds to
    # every interface (`::`); that is outside layercast (see README, Faults). The HTTP server, which
    # carries the admin routes, and the API server process as a whole must be on loopback.
    api_pid = server.proc.pid
    pids = {p.pid for p in _tree(api_pid)}
    listening = [
        c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    http = [c for c in listening if c.laddr.port == server.port]
    assert [c.laddr.ip for c in http] == ["127.0.0.1"], http
    api = [c for c in listening if c.pid == api_pid]
    assert api and all(c.laddr.ip == "127.0.0.1" for c in api), api


def test_first_sync(server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module) -> None:
    assert complete(server.url).version == "initial"
    bc.init()
    normal_sync(bc, trainer_model, server.url, 1)


@pytest.mark.parametrize("route", ["/init_broadcaster", "/update_weights"])
@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"{not json", "json"),
        (b"[1, 2, 3]", "object"),
        (b"{}", "missing"),
        (b'{"sync_id": "s", "weights_version": "seven"}', "weights_version"),
        (b'{"sync_id": "bad id/with slash", "weights_version": 2}', "sync_id"),
        (b'{"master_address": "h", "master_port": 70000, "world_size": 2, "rank_offset": 1}', "master_port"),
        (b'{"master_address": "h", "master_port": 5, "world_size": "2x", "rank_offset": 1}', "world_size"),
    ],
)
def test_malformed_bodies_are_refused_naming_the_problem(
    server: ServerProcess, route: str, content: bytes, named: str
) -> None:
    before = weights(server.url)
    r = httpx.post(server.url + route, content=content, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code in (400, 422), r.text  # vLLM's app answers validation errors with 400
    assert named in r.text.lower() or (named == "missing" and "field required" in r.text.lower()), r.text
    assert weights(server.url) == before


def test_huge_bodies_are_413_before_parsing(server: ServerProcess) -> None:
    before = weights(server.url)
    huge = b'{"sync_id": "' + b"x" * (8 << 20) + b'", "weights_version": 1}'
    for route in ("/update_weights", "/init_broadcaster"):
        t0 = time.monotonic()
        r = httpx.post(server.url + route, content=huge, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413 and str(MAX_ADMIN_BODY_BYTES) in r.text, r.text
        assert time.monotonic() - t0 < 10

    def chunked() -> Iterator[bytes]:  # no content-length: the limit applies to what is streamed
        yield b'{"sync_id": "'
        for _ in range(64):
            yield b"y" * 4096
        yield b'", "weights_version": 1}'

    r = httpx.post(server.url + "/update_weights", content=chunked(), headers=AUTH)
    assert r.status_code == 413, r.text
    # Unauthenticated clients cannot make the server buffer a huge body either: 401 before it is read,
    # on every admin route (the /check dry run included).
    for route in ("/update_weights", "/init_broadcaster", "/check"):
        assert httpx.post(server.url + route, content=huge).status_code == 401, route
    # Just under the limit: parsed normally (and refused for its content).
    near = b'{"sync_id": "' + b"z" * (MAX_ADMIN_BODY_BYTES - 100) + b'", "weights_version": 1}'
    r = httpx.post(
        server.url + "/update_weights", content=near, headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code in (400, 422) and "sync_id" in r.text
    assert weights(server.url) == before


def test_unknown_routes_and_methods(server: ServerProcess) -> None:
    for path in ("/update_weight", "/v1/update_weights", "/init_broadcaster/extra", "/admin"):
        assert httpx.post(server.url + path, json={}, headers=AUTH).status_code == 404, path
    assert httpx.get(server.url + "/update_weights", headers=AUTH).status_code == 405
    assert httpx.delete(server.url + "/weights").status_code == 405


def test_wrong_token_is_403_and_missing_token_401(server: ServerProcess) -> None:
    body = {"sync_id": "auth-probe", "weights_version": 1}
    assert httpx.post(server.url + "/update_weights", json=body).status_code == 401
    r = httpx.post(
        server.url + "/update_weights", json=body, headers={"Authorization": f"Bearer {WRONG_TOKEN}"}
    )
    assert r.status_code == 403 and WRONG_TOKEN not in r.text and TOKEN not in r.text
    r = httpx.post(server.url + "/update_weights", json=body, headers={"Authorization": f"Basic {TOKEN}"})
    assert r.status_code == 401


# ------------------------------------------------------------------ group formation faults


def test_wrong_world_size_names_both_sides_then_a_sync_works(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    bc.close()  # this test plays other trainers: the first one leaves (the server refuses a live one's)
    before, before_gen = weights(server.url), complete(server.url)
    port = free_port()
    trainer = InThread(lambda: Group("127.0.0.1", port, 2, 0, who="trainer", timeout_s=20))
    body = {"master_address": "127.0.0.1", "master_port": port, "world_size": 3, "rank_offset": 1,
            "rendezvous_timeout_s": 20}  # fmt: skip
    t0 = time.monotonic()
    r = httpx.post(server.url + "/init_broadcaster", json=body, headers=AUTH, timeout=60)
    took = time.monotonic() - t0
    err, trainer_took = trainer.outcome()
    assert isinstance(err, RendezvousError), err
    for message in (str(err), r.text):
        assert "world_size disagreement" in message and "says world_size=3" in message, message
        assert "rank 0 (trainer) says world_size=2" in message and "inference server" in message, message
    assert r.status_code >= 400 and took < 15 and trainer_took < 15
    status = weights(server.url)
    assert status["state"] == "failed" and status["weights_version"] == before["weights_version"]
    gen = complete(server.url)  # the weights were never touched: still served, same version
    assert gen.status == 200 and (gen.version, gen.tokens) == (before_gen.version, before_gen.tokens)
    # The trainer sees the server left its group (state `failed`) and re-joins on its own.
    old_group = bc.group
    normal_sync(bc, trainer_model, server.url, 2)
    assert bc.group is not old_group


def test_duplicate_rank_offset_names_both_claimants_then_a_sync_works(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    bc.close()  # this test plays other trainers: the first one leaves (the server refuses a live one's)
    before = weights(server.url)
    port = free_port()
    trainer = InThread(lambda: Group("127.0.0.1", port, 3, 0, who="trainer", timeout_s=20))
    impostor = InThread(lambda: Group("127.0.0.1", port, 3, 1, who="other server at offset 1", timeout_s=20))
    body = {"master_address": "127.0.0.1", "master_port": port, "world_size": 3, "rank_offset": 1,
            "rendezvous_timeout_s": 20}  # fmt: skip
    r = httpx.post(server.url + "/init_broadcaster", json=body, headers=AUTH, timeout=60)
    errors = [trainer.outcome(), impostor.outcome()]
    for err, took in errors:
        assert isinstance(err, RendezvousError) and took < 15, err
    for message in (str(errors[0][0]), str(errors[1][0]), r.text):
        assert "rank 1 claimed twice" in message, message
        assert "other server at offset 1" in message and "inference server ranks 1..1" in message, message
    assert r.status_code >= 400
    assert weights(server.url)["weights_version"] == before["weights_version"]
    normal_sync(bc, trainer_model, server.url, 3)


def test_unreachable_rendezvous_host_fails_within_the_deadline(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    bc.close()  # this test plays other trainers: the first one leaves (the server refuses a live one's)
    before, before_gen = weights(server.url), complete(server.url)
    port = free_port()
    for host in ("192.0.2.1", "127.0.0.1"):  # TEST-NET (unroutable) / nobody hosting the store
        body = {"master_address": host, "master_port": port, "world_size": 2, "rank_offset": 1,
                "rendezvous_timeout_s": 3}  # fmt: skip
        t0 = time.monotonic()
        r = httpx.post(server.url + "/init_broadcaster", json=body, headers=AUTH, timeout=60)
        took = time.monotonic() - t0
        assert r.status_code == 504 and took < 3 + 10, (r.status_code, took, r.text)  # a deadline
        assert f"{host}:{port}" in r.text and "rank 0 to host the store" in r.text, r.text
    gen = complete(server.url)
    assert gen.status == 200 and (gen.version, gen.tokens) == (before_gen.version, before_gen.tokens)
    # The trainer side: a master address it cannot host the store at.
    unhostable = toy_broadcaster(server, TOKEN, master_address="192.0.2.1", rendezvous_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(PushError, match=r"could not host the store at 192\.0\.2\.1:\d+"):
        unhostable.init()
    # torch's own store client (hosting connects to the host) retries once: up to ~2x the deadline.
    assert time.monotonic() - t0 < 2 * 3 + 10
    assert weights(server.url)["weights_version"] == before["weights_version"]
    normal_sync(bc, trainer_model, server.url, 4)


# ------------------------------------------------------------------ the trainer's stream vs the served model


def _refused(
    bc: WeightBroadcaster, url: str, specs: list[tuple[str, Any, tuple[int, ...]]], scheme: QuantScheme
) -> tuple[str, httpx.Response]:
    """Send a header for `specs` (no data follows); returns the trainer's refusal and the server's answer."""
    assert bc.group is not None
    header = make_header(specs, sync_id="mismatch", weights_version=99, scheme=scheme, bucket_size=64 * 1024)
    armed = BackgroundPost(url + "/update_weights", {"sync_id": "mismatch", "weights_version": 99}, TOKEN)
    with pytest.raises(SyncRefused) as info:
        Sender(bc.group, timeouts=Timeouts(header_s=30, vote_s=30)).send(header, iter(()))
    return str(info.value), armed.response()


def _specs(model: torch.nn.Module, scheme: QuantScheme) -> list[tuple[str, Any, tuple[int, ...]]]:
    return [(s.name, s.dtype, s.shape) for s in plan_stream(model, scheme)]


@pytest.mark.parametrize("case", ["scheme", "names", "shapes", "dtypes"])
def test_stream_not_matching_the_served_model_is_refused_before_data_moves(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module, case: str
) -> None:
    bc._ensure_group()  # a group an earlier failed test left broken would refuse for another reason
    before, before_gen = weights(server.url), complete(server.url)
    group = bc.group
    scheme = bc.scheme
    if case == "scheme":
        scheme = detect_quant_scheme(FP8_CONFIG)
        specs, named = _specs(trainer_model, scheme), "trainer sends scheme fp8"
    elif case == "names":  # Llama has no q_norm / k_norm
        specs, named = _specs(toy_model(toy_config("llama")), scheme), "q_norm"
    elif case == "shapes":
        specs, named = _specs(toy_model(toy_config("qwen3", intermediate_size=192)), scheme), "192"
    else:
        specs = _specs(trainer_model, scheme)
        name, _, shape = specs[3]
        specs[3] = (name, torch.int8, shape)
        named = f"{name}: dtype int8 cannot load into float32"
    refusal, answer = _refused(bc, server.url, specs, scheme)
    assert named in refusal and "rank(s) [1]" in refusal, refusal
    assert answer.status_code == 409 and named in answer.text, answer.text
    assert_unchanged(server.url, before, before_gen)
    assert bc.group is group and group is not None and group.broken is None  # refused, group kept
    normal_sync(bc, trainer_model, server.url, 5 + ["scheme", "names", "shapes", "dtypes"].index(case))
    assert bc.group is group


def test_trainer_configured_for_fp8_against_an_fp32_server_is_refused(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    before, before_gen = weights(server.url), complete(server.url)
    wrong = toy_broadcaster(server, TOKEN, inference_config=FP8_CONFIG, takeover=True)
    try:
        wrong.init()
        with pytest.raises(PushError) as info:
            wrong.push(trainer_model, 50)
    finally:
        wrong.close()
    message = str(info.value)
    assert "sync refused" in message and "weight_scale_inv" in message and "float8_e4m3fn" in message, message
    assert_unchanged(server.url, before, before_gen)
    bc.init()  # another trainer took the server over; the right one joins it again (same processes)
    normal_sync(bc, trainer_model, server.url, 10)


# ------------------------------------------------------------------ retries and concurrency


def test_retry_after_a_failed_sync_with_the_same_and_a_new_sync_id(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    assert bc.group is not None
    # 1. A sync that fails mid-stream (the trainer's producer raises): torn, 503 until a full sync.
    perturb_(trainer_model, 11)
    specs = _specs(trainer_model, bc.scheme)
    header = make_header(
        specs, sync_id="step-11", weights_version=11, scheme=bc.scheme, bucket_size=64 * 1024
    )

    def dies_halfway() -> Iterator[tuple[str, torch.Tensor]]:
        tensors = [t for c in iter_layer_chunks(trainer_model, bc.scheme) for t in c.tensors]
        yield from tensors[: len(tensors) // 2]
        raise RuntimeError("optimizer state corrupted")

    armed = BackgroundPost(
        server.url + "/update_weights", {"sync_id": "step-11", "weights_version": 11}, TOKEN
    )
    with pytest.raises(BroadcastError, match="optimizer state corrupted"):
        Sender(bc.group).send(header, dies_halfway())
    assert armed.response().status_code == 502
    status = weights(server.url)
    assert status["state"] == "torn" and "optimizer state corrupted" in status["last_error"]
    gen = complete(server.url)
    assert gen.status == 503 and "torn" in gen.text and "optimizer state corrupted" in gen.text
    # 2. The same sync id again: not mistaken for applied, armed and applied.
    orch = SyncOrchestrator([server.url], token=TOKEN, timeout_s=60)
    report = orch.sync_step(lambda: bc.push(trainer_model, 11, sync_id="step-11", arm=False), "step-11", 11)
    assert not report.already_applied and report.servers[server.url].action == "armed"
    assert weights(server.url)["state"] == "ready" and complete(server.url).version == "11"
    assert_serves(server.url, trainer_model)
    again = orch.sync_step(lambda: pytest.fail("must not send again"), "step-11", 11)
    assert again.already_applied
    # 3. A refused sync (server armed for another version), retried under a new sync id.
    before, before_gen = weights(server.url), complete(server.url)
    perturb_(trainer_model, 12)
    armed = BackgroundPost(
        server.url + "/update_weights", {"sync_id": "step-12", "weights_version": 13}, TOKEN
    )
    with pytest.raises(SyncRefused, match="weights_version 12, this server was asked for 13"):
        Sender(bc.group).send(
            make_header(
                specs, sync_id="step-12", weights_version=12, scheme=bc.scheme, bucket_size=64 * 1024
            ),
            (t for c in iter_layer_chunks(trainer_model, bc.scheme) for t in c.tensors),
        )
    assert armed.response().status_code == 409
    assert_unchanged(server.url, before, before_gen)
    report = orch.sync_step(lambda: bc.push(trainer_model, 12, sync_id="step-12b", arm=False), "step-12b", 12)
    assert report.servers[server.url].ok and complete(server.url).version == "12"
    assert_serves(server.url, trainer_model)


def test_two_concurrent_updates_one_is_409_the_other_applies(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    perturb_(trainer_model, 13)
    first = BackgroundPost(
        server.url + "/update_weights", {"sync_id": "step-13", "weights_version": 13}, TOKEN
    )
    deadline = time.monotonic() + 30
    while weights(server.url)["state"] != "syncing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for body in ({"sync_id": "step-13", "weights_version": 13}, {"sync_id": "other", "weights_version": 14}):
        r = httpx.post(server.url + "/update_weights", json=body, headers=AUTH)
        assert r.status_code == 409 and "in progress" in r.text
    init = {"master_address": "127.0.0.1", "master_port": free_port(), "world_size": 2, "rank_offset": 1}
    r = httpx.post(server.url + "/init_broadcaster", json=init, headers=AUTH)
    assert r.status_code == 409 and "in progress" in r.text
    bc.push(trainer_model, 13, sync_id="step-13", arm=False)
    answer = first.response()
    assert answer.status_code == 200 and answer.json()["weights_version"] == 13
    assert weights(server.url)["weights_version"] == 13 and complete(server.url).version == "13"
    assert_serves(server.url, trainer_model)


# ------------------------------------------------------------------ load: syncs while clients generate

LOAD_SYNCS = 100
LOAD_CLIENTS = 2


def test_every_response_comes_from_exactly_one_complete_version_under_load(
    server: ServerProcess, bc: WeightBroadcaster
) -> None:
    """120 back-to-back syncs cycling through 3 weight sets while clients generate without pause.

    Every response carries the version tag; its tokens equal that version's weight set's greedy tokens
    and its logprobs are within 1e-3 of them (a response with tokens from two versions would match
    neither reference)."""
    sets = [toy_model(toy_config("qwen3", torch.float32), seed=100 + k) for k in range(3)]
    refs = [reference_greedy(m, PROMPT, MAX_TOKENS) for m in sets]
    assert len({tuple(t) for t, _ in refs}) == 3, "the weight sets must be told apart by their tokens"
    base = 1000
    bc.push(sets[0], base)
    stop = threading.Event()
    seen: list[Completion] = []

    def client() -> None:
        with httpx.Client() as http:
            while not stop.is_set():
                seen.append(complete(server.url, http))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(LOAD_CLIENTS)]
    for t in clients:
        t.start()
    t0 = time.monotonic()
    for i in range(1, LOAD_SYNCS + 1):
        bc.push(sets[i % 3], base + i, sync_id=f"load-{i}")
    sync_s = time.monotonic() - t0
    time.sleep(0.5)
    stop.set()
    for t in clients:
        t.join(60)
    bad = [c for c in seen if c.status != 200]
    assert not bad, f"{len(bad)} failed responses, first: {bad[0].status} {bad[0].text[:300]}"
    versions = set()
    for c in seen:
        assert c.version is not None, "untagged response"
        v = int(c.version)
        assert base <= v <= base + LOAD_SYNCS, c.version
        tokens, lps = refs[(v - base) % 3]
        assert c.tokens == tokens, f"version {v}: tokens {c.tokens} are not its weights' {tokens}"
        assert max(abs(a - b) for a, b in zip(c.logprobs, lps, strict=True)) < 1e-3, v
        versions.add(v)
    assert weights(server.url)["weights_version"] == base + LOAD_SYNCS
    print(
        f"\n{LOAD_SYNCS} syncs in {sync_s:.1f} s ({sync_s / LOAD_SYNCS * 1e3:.0f} ms each) while "
        f"{LOAD_CLIENTS} clients got {len(seen)} responses from {len(versions)} distinct versions"
    )
    assert len(seen) >= LOAD_SYNCS // 2 and len(versions) >= 20, (len(seen), len(versions))


# ------------------------------------------------------------------ secrets (last: covers the whole module)


def test_a_bucket_above_the_servers_cap_is_refused_before_data_moves(
    server: ServerProcess, bc: WeightBroadcaster, trainer_model: torch.nn.Module
) -> None:
    before, before_gen = weights(server.url), complete(server.url)
    big = toy_broadcaster(server, TOKEN, bucket_bytes=4 * SERVER_MAX_BUCKET, takeover=True)
    try:
        with pytest.raises(PushError, match=f"exceeds this receiver's limit of {SERVER_MAX_BUCKET}"):
            big.push(trainer_model, before["weights_version"] + 1)
    finally:
        big.close()
    assert_unchanged(server.url, before, before_gen)
    bc.init()  # big took the server over (and has gone): the first trainer joins again explicitly
    normal_sync(bc, trainer_model, server.url, before["weights_version"] + 2)


def test_the_token_never_appears_in_the_server_log(server: ServerProcess) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "/update_weights" in log or "POST" in log, "the log holds no requests: nothing was checked"
    assert TOKEN not in log and WRONG_TOKEN not in log
    status = httpx.get(server.url + "/weights").text
    assert TOKEN not in status
