"""HTTP client for one layercast inference server (httpx; sync and async flavours share the models)."""

from __future__ import annotations

import functools
import ssl
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from configs.api import (
    InitBroadcasterRequest,
    InitBroadcasterResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightsStatus,
)

T = TypeVar("T", bound=BaseModel)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process, shared by every client: httpx builds a new one (loading the CA bundle,
    20-40 ms) for each client it creates, and a sync creates clients each time (measured: 25 ms per client
    vs 1.3 ms with this one shared)."""
    return httpx.create_ssl_context()


class ServerError(RuntimeError):
    """A server answered with an error status; `status_code` and the server's `detail` are kept."""

    def __init__(self, url: str, status_code: int, detail: str) -> None:
        super().__init__(f"{url} answered {status_code}: {detail}")
        self.url = url
        self.status_code = status_code
        self.detail = detail


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body))
        return detail if isinstance(detail, str) else str(detail)
    return str(body)


def _parse(resp: httpx.Response, model: type[T]) -> T:
    if resp.status_code >= 400:
        raise ServerError(str(resp.request.url), resp.status_code, _detail(resp))
    return model.model_validate(resp.json())


class AsyncServerClient:
    """Talks to one server's layercast routes; every call has a deadline."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=timeout_s, verify=tls_context()
        )

    async def __aenter__(self) -> AsyncServerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def init_broadcaster(
        self, req: InitBroadcasterRequest, timeout_s: float | None = None
    ) -> InitBroadcasterResponse:
        timeout = timeout_s or req.rendezvous_timeout_s + 30.0
        resp = await self._http.post("/init_broadcaster", json=req.model_dump(mode="json"), timeout=timeout)
        return _parse(resp, InitBroadcasterResponse)

    async def update_weights(
        self, req: UpdateWeightsRequest, timeout_s: float | None = None
    ) -> UpdateWeightsResponse:
        timeout = timeout_s or (req.timeout_s or 600.0) + 30.0
        resp = await self._http.post("/update_weights", json=req.model_dump(mode="json"), timeout=timeout)
        return _parse(resp, UpdateWeightsResponse)

    async def weights(self) -> WeightsStatus:
        return _parse(await self._http.get("/weights"), WeightsStatus)

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def complete_tokens(
        self, model: str, prompt_token_ids: list[int], max_tokens: int, logprobs: int | None = None
    ) -> dict[str, Any]:
        """Greedy completion of token ids through vLLM's OpenAI route (used to verify a sync)."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt_token_ids,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
        resp = await self._http.post("/v1/completions", json=body)
        if resp.status_code >= 400:
            raise ServerError(str(resp.request.url), resp.status_code, _detail(resp))
        return resp.json()
