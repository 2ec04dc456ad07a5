"""Helpers shared by the tests that run a real `layercast serve` on a built-in tiny model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from broadcaster.errors import BroadcastError
from broadcaster.framing import make_header
from broadcaster.sender import Sender
from configs.trainer import BroadcasterConfig
from rpc.client.http_client import AsyncServerClient
from rpc.tools.demo import PROMPT, reference_greedy
from rpc.tools.launch import ServerProcess, free_port, tiny_model_serve_args
from tests.conftest import ENGINE_ENV
from trainer_side.broadcast import WeightBroadcaster
from trainer_side.toy_models import save_toy
from trainer_side.walker import iter_layer_chunks, plan_stream

MAX_TOKENS = 6


def start_toy_server(
    model: torch.nn.Module, work: Path, *, token: str | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """Write `model` under `work/model` and serve it; returns once `/health` answers."""
    proc = ServerProcess(
        save_toy(model, work / "model"), extra_args=tiny_model_serve_args(), env=ENGINE_ENV | (env or {}),
        log_path=work / "server.log", token=token,
    )  # fmt: skip
    try:
        proc.wait_ready(300)
    except BaseException:
        proc.stop()
        raise
    return proc


def model_dir(server: ServerProcess) -> str:
    return str(server.log_path.parent / "model")


def generate(url: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], list[float]]:
    """Greedy tokens and logprobs of the fixed prompt, through vLLM's OpenAI route."""

    async def run() -> dict[str, Any]:
        async with AsyncServerClient(url) as c:
            return await c.complete_tokens("toy", PROMPT, max_tokens, logprobs=1)

    choice = asyncio.run(run())["choices"][0]
    return list(choice["token_ids"]), [float(x) for x in choice["logprobs"]["token_logprobs"]]


def assert_serves(url: str, model: torch.nn.Module, max_tokens: int = MAX_TOKENS) -> None:
    """The server's greedy generation equals the trainer model's (tokens; logprobs within 1e-3)."""
    tokens, lps = generate(url, max_tokens)
    ref_tokens, ref_lps = reference_greedy(model, PROMPT, max_tokens)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True)) < 1e-3


def toy_broadcaster(server: ServerProcess, token: str | None = None, **overrides: Any) -> WeightBroadcaster:
    """A trainer-side broadcaster for `server`, with small buckets and short deadlines for tests."""
    fields: dict[str, Any] = {
        "servers": [server.url],
        "inference_config": model_dir(server),
        "master_port": free_port(),
        "token": token,
        "bucket_bytes": 256 * 1024,
        "step_timeout_s": 30,
        "rendezvous_timeout_s": 60,
    }
    return WeightBroadcaster(BroadcasterConfig(**(fields | overrides)))


class BackgroundPost:
    """POST in a thread (e.g. arm `/update_weights` while this thread plays the trainer)."""

    def __init__(
        self, url: str, body: dict[str, Any], token: str | None = None, timeout_s: float = 60
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._response: httpx.Response | None = None
        self._thread = threading.Thread(
            target=lambda: setattr(
                self, "_response", httpx.post(url, json=body, headers=headers, timeout=timeout_s)
            )
        )
        self._thread.start()

    def response(self, timeout_s: float = 60) -> httpx.Response:
        self._thread.join(timeout_s)
        assert self._response is not None, "the background request did not finish"
        return self._response


def send_dying_sync(
    url: str,
    bc: WeightBroadcaster,
    model: torch.nn.Module,
    sync_id: str,
    version: int,
    token: str | None = None,
) -> httpx.Response:
    """Arm the server at `url` for `sync_id`, then send it over `bc`'s group with a producer that dies after
    half the tensors (the sender must raise naming it); returns the server's answer to the armed call."""
    assert bc.group is not None
    specs = plan_stream(model, bc.scheme)
    header = make_header(
        [(s.name, s.dtype, s.shape) for s in specs],
        sync_id=sync_id,
        weights_version=version,
        scheme=bc.scheme,
        bucket_size=64 * 1024,
    )

    def dies_halfway() -> Iterator[tuple[str, torch.Tensor]]:
        tensors = [t for c in iter_layer_chunks(model, bc.scheme) for t in c.tensors]
        yield from tensors[: len(tensors) // 2]
        raise RuntimeError("trainer crashed while quantizing")

    armed = BackgroundPost(url + "/update_weights", {"sync_id": sync_id, "weights_version": version}, token)
    with pytest.raises(BroadcastError, match="trainer crashed"):
        Sender(bc.group).send(header, dies_halfway())
    return armed.response()
