"""Helpers shared by the tests that run a real `layercast serve` on a built-in tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import torch

from rpc.client import AsyncServerClient
from rpc.demo import PROMPT, reference_greedy
from rpc.launch import ServerProcess, tiny_model_serve_args
from trainer_side.toy_models import save_toy

MAX_TOKENS = 6


def start_toy_server(
    model: torch.nn.Module, work: Path, *, token: str | None = None, env: dict[str, str] | None = None
) -> ServerProcess:
    """Write `model` under `work/model` and serve it; returns once `/health` answers."""
    proc = ServerProcess(
        save_toy(model, work / "model"), extra_args=tiny_model_serve_args(), env=env,
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
