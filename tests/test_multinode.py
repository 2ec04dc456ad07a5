"""Multi-node sync on one machine: a trainer "host" and two inference "hosts" in their own network namespaces.

Topology (see `tests/netns.py`): three namespaces, each with loopback up and one veth on a root-namespace
bridge, each with its own address on a private /24 (no default route: nothing leaves the machine). One
`layercast serve` (vLLM CPU build) runs in each inference namespace, bound to that namespace's address;
the trainer runs in its namespace as a subprocess (this file's `__main__`) with `master_address` set to its
own address, so the HTTP calls and the Gloo rendezvous/broadcast all cross the virtual network. Gloo picks
its interface from `GLOO_SOCKET_IFNAME` (the namespace's veth): the hostname resolves to 127.0.0.1 here.

The trainer runs several syncs (a plain `push`, then `SyncOrchestrator.sync_step` with `arm=False`),
checks greedy generation and logprobs on both servers against its own model after each, a same-id retry
(skipped), and a partial retry (refused, naming the server that lacks the sync). Skipped with the reason
when namespaces cannot be made (not root, `ip netns add` refused), except under CI (`CI` set), where
that fails: CI's setup installs iproute2 and runs as root.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # when run as a script inside the trainer namespace
    sys.path.insert(0, str(REPO))

from tests.conftest import ENGINE_ENV  # noqa: E402
from tests.netns import Host, NetnsUnavailable, VirtualNetwork  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.netns]
TOKEN = "multinode-test-token"
SERVE_PORT = 8000  # each namespace has its own port space
MASTER_PORT = 29600
STEPS = 3
MAX_TOKENS = 6
SERVE_ARGS = [
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--max-num-seqs",
    "2",
    "--enforce-eager",
    "--served-model-name",
    "toy",
    "--kv-cache-memory-bytes",
    str(32 * 2**20),
]


@dataclass
class Cluster:
    net: VirtualNetwork
    model_dir: Path
    urls: list[str]
    logs: list[Path]
    work: Path


def _env(host: Host) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "GLOO_SOCKET_IFNAME": host.ifname,
        "VLLM_HOST_IP": host.address,
        "NO_PROXY": "*",
        "no_proxy": "*",
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(
    procs: list[subprocess.Popen[bytes]], urls: list[str], logs: list[Path], timeout_s: float
) -> None:
    pending = set(range(len(urls)))
    deadline = time.monotonic() + timeout_s
    while pending:
        for i in sorted(pending):
            if procs[i].poll() is not None:
                raise RuntimeError(f"server {urls[i]} exited with {procs[i].returncode}:\n{_tail(logs[i])}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(urls[i] + "/health", timeout=2.0).status_code == 200:
                    pending.discard(i)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {urls[i]}:\n{_tail(logs[i])}" for i in pending)
            raise TimeoutError(f"servers not ready after {timeout_s:.0f} s:\n{tails}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        net = VirtualNetwork(["trainer", "inf0", "inf1"])
    except NetnsUnavailable as exc:
        if os.environ.get("CI"):  # CI runs as root with iproute2 installed: a skip there hides a break
            pytest.fail(f"multi-node test needs network namespaces, and CI must run it: {exc}")
        pytest.skip(f"multi-node test needs network namespaces: {exc}")
    procs: list[subprocess.Popen[bytes]] = []
    log_files: list[Any] = []
    try:
        import torch

        from trainer_side.toy_models import save_toy, toy_config, toy_model

        work = tmp_path_factory.mktemp("multinode")
        model_dir = save_toy(toy_model(toy_config("qwen3", torch.float32), seed=0), work / "model")
        urls, logs = [], []
        for name in ("inf0", "inf1"):
            host = net[name]
            url = f"http://{host.address}:{SERVE_PORT}"
            log = work / f"{name}.log"
            log_files.append(open(log, "wb"))  # noqa: SIM115 - closed in the finalizer
            argv = host.argv(
                sys.executable, "-m", "rpc.tools.cli", "serve", str(model_dir),
                "--host", host.address, "--port", str(SERVE_PORT), *SERVE_ARGS,
            )  # fmt: skip
            env = {**_env(host), **ENGINE_ENV, "LAYERCAST_ADMIN_TOKEN": TOKEN}
            log_file = log_files[-1]
            proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
            procs.append(proc)
            urls.append(url)
            logs.append(log)
        _wait_ready(procs, urls, logs, timeout_s=200)
        yield Cluster(net, model_dir, urls, logs, work)
    finally:
        for p in procs:
            _stop(p)
        for f in log_files:
            f.close()
        net.close()


@pytest.mark.timeout(420)
def test_syncs_across_namespaces(cluster: Cluster) -> None:
    trainer = cluster.net["trainer"]
    out = cluster.work / "trainer.json"
    argv = trainer.argv(
        sys.executable, str(Path(__file__).resolve()), "--master-address", trainer.address,
        "--model-dir", str(cluster.model_dir), "--out", str(out), *cluster.urls,
    )  # fmt: skip
    rx_before = {name: cluster.net.counters(name)[0] for name in ("inf0", "inf1")}
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env=_env(trainer), capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - started
    server_logs = "\n".join(f"--- {u}:\n{_tail(p)}" for u, p in zip(cluster.urls, cluster.logs, strict=True))
    assert proc.returncode == 0, (
        f"trainer failed ({proc.returncode}) after {elapsed:.0f} s:\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-6000:]}\n{server_logs}"
    )
    result = json.loads(out.read_text())
    # Every sync's payload crossed each inference host's veth (Gloo over the virtual network, not lo):
    # inf0 took 5 syncs (one through its own group), inf1 took 4.
    for name, syncs in (("inf0", STEPS + 2), ("inf1", STEPS + 1)):
        rx = cluster.net.counters(name)[0] - rx_before[name]
        assert rx > syncs * result["bytes_per_sync"], (name, rx, result["bytes_per_sync"])
    # The group really spans the namespaces: the servers' ranks come from the trainer's init over HTTP.
    assert sorted(r for ranks in result["init_ranks"].values() for r in ranks) == [1, 2]
    assert [s["version"] for s in result["steps"]] == [*range(1, STEPS + 1), STEPS + 1]
    for step in result["steps"]:
        for url in cluster.urls:
            got = step["servers"][url]
            assert got["tokens"] == step["reference_tokens"], (step["version"], url)
            assert got["max_logprob_diff"] < 1e-3, (step["version"], url, got["max_logprob_diff"])
            assert got["weights_version"] == step["version"] and got["last_sync_id"] == step["sync_id"]
    # The weights really changed between steps (otherwise the checks above prove little).
    assert len({tuple(s["reference_tokens"]) for s in result["steps"]}) > 1
    assert result["retry_already_applied"] is True
    assert result["partial_retry_named"] == [cluster.urls[1]]
    print(f"trainer in {elapsed:.1f} s; " + "; ".join(result["summaries"]))


# ---------------------------------------------------------------------- trainer (runs in its namespace)


def _generate(url: str) -> tuple[list[int], list[float]]:
    from rpc.client.http_client import AsyncServerClient
    from rpc.tools.demo import PROMPT

    async def run() -> dict[str, Any]:
        async with AsyncServerClient(url, timeout_s=60) as c:
            return await c.complete_tokens("toy", PROMPT, MAX_TOKENS, logprobs=1)

    choice = asyncio.run(run())["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def trainer_main(argv: list[str]) -> int:
    """Init, STEPS syncs (1 plain push, the rest through the orchestrator), a same-id retry, a partial
    retry, one more sync; every step's generation checked on every server. Writes a JSON result."""
    import torch

    from configs.trainer import BroadcasterConfig
    from rpc.client.orchestrator import PartialRetry, SyncOrchestrator
    from rpc.tools.demo import PROMPT, reference_greedy
    from trainer_side.broadcast import WeightBroadcaster
    from trainer_side.toy_models import perturb_, toy_config, toy_model

    p = argparse.ArgumentParser()
    p.add_argument("--master-address", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("servers", nargs="+")
    args = p.parse_args(argv)
    model = toy_model(toy_config("qwen3", torch.float32), seed=0)

    def broadcaster(servers: list[str], port: int, takeover: bool = False) -> WeightBroadcaster:
        return WeightBroadcaster(
            BroadcasterConfig(
                servers=servers,
                inference_config=args.model_dir,
                master_address=args.master_address,
                master_port=port,
                token=TOKEN,
                bucket_bytes=256 * 1024,
                step_timeout_s=30,
                rendezvous_timeout_s=60,
                takeover=takeover,
            )
        )

    bc = broadcaster(args.servers, MASTER_PORT)
    orch = SyncOrchestrator(args.servers, token=TOKEN, timeout_s=60)
    result: dict[str, Any] = {"steps": [], "summaries": []}
    result["init_ranks"] = {u: r.ranks for u, r in bc.init().items()}

    def check(version: int, sync_id: str) -> None:
        ref_tokens, ref_lps = reference_greedy(model, PROMPT, MAX_TOKENS)
        step: dict[str, Any] = {"version": version, "sync_id": sync_id, "reference_tokens": ref_tokens}
        step["servers"] = {}
        for url in args.servers:
            tokens, lps = _generate(url)
            status = httpx.get(url + "/weights", timeout=10).json()
            step["servers"][url] = {
                "tokens": tokens,
                "max_logprob_diff": max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)),
                "weights_version": status["weights_version"],
                "last_sync_id": status["last_sync_id"],
            }
        result["steps"].append(step)

    for version in range(1, STEPS + 1):
        perturb_(model, version)
        sid = f"mn-{version}"
        if version == 1:
            push = bc.push(model, version, sync_id=sid)
            result["bytes_per_sync"] = push.bytes_sent
            result["summaries"].append(push.summary())
        else:
            report = orch.sync_step(
                lambda v=version, s=sid: bc.push(model, v, sync_id=s, arm=False), sid, version
            )
            result["summaries"].append(report.summary())
        check(version, sid)

    def must_not_send() -> None:
        raise AssertionError("asked to resend a sync every server already has")

    result["retry_already_applied"] = orch.sync_step(must_not_send, f"mn-{STEPS}", STEPS).already_applied

    # Partial: only the first server gets sync "mn-partial" (through its own group); a retry of that id
    # over both servers must be refused, naming the second server.
    perturb_(model, STEPS + 1)
    only_first = broadcaster(args.servers[:1], MASTER_PORT + 1, takeover=True)  # a second trainer
    only_first.init()
    only_first.push(model, STEPS + 1, sync_id="mn-partial")
    only_first.close()
    try:
        orch.sync_step(must_not_send, "mn-partial", STEPS + 1)
        result["partial_retry_named"] = []
    except PartialRetry as exc:
        result["partial_retry_named"] = sorted(exc.failures)
    # Recover: re-join both servers, sync the same weights under a fresh id, check both.
    bc.init()
    sid = "mn-final"
    report = orch.sync_step(lambda: bc.push(model, STEPS + 1, sync_id=sid, arm=False), sid, STEPS + 1)
    result["summaries"].append(report.summary())
    check(STEPS + 1, sid)
    bc.close()
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(trainer_main(sys.argv[1:]))
