"""vLLM endpoint plugin that adds layercast's routes to vLLM's own OpenAI-compatible server app.

Registered under the `vllm.endpoint_plugins` entry-point group (see pyproject.toml) and enabled by
`layercast serve` through `VLLM_PLUGINS`; users keep every vLLM route and flag. Also installs the
middlewares of `rpc.middleware`: the admin body limit (413) and the generation gate (503 while the
model is torn, no generation while a sync is applied, responses tagged with their weights version).
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from configs.api import WeightsStatus
from inference_worker.engine_backend import VllmSyncBackend
from rpc.errors import NotReady
from rpc.middleware import AdminBodyLimit, GenerationGate
from rpc.routes import build_router
from rpc.weights_gate import WeightsGate

PLUGIN_NAME = "layercast"
TOKEN_ENV = "LAYERCAST_ADMIN_TOKEN"


class LayercastEndpointPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.backend: VllmSyncBackend | None = None
        self.gate = WeightsGate()

    def _backend(self) -> VllmSyncBackend:
        if self.backend is None:
            raise NotReady("the engine is not up yet")
        return self.backend

    def _status(self) -> WeightsStatus | None:
        return self.backend.status() if self.backend is not None else None

    def attach_router(self, app: FastAPI) -> None:
        before = len(app.router.routes)
        app.include_router(build_router(self._backend, os.environ.get(TOKEN_ENV) or None, self.gate))
        # Starlette takes the first matching route: put ours first, so that with VLLM_SERVER_DEV_MODE=1
        # layercast's /update_weights wins over vLLM's weight-transfer route of the same path (its
        # /pause, /resume and the rest stay available).
        ours = app.router.routes[before:]
        del app.router.routes[before:]
        app.router.routes[:0] = ours
        app.add_middleware(GenerationGate, gate=self.gate, status=self._status)
        app.add_middleware(AdminBodyLimit)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is not None:
            self.backend = VllmSyncBackend(engine_client)
