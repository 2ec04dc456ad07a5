"""vLLM endpoint plugin that adds layercast's routes to vLLM's own OpenAI-compatible server app.

Registered under the `vllm.endpoint_plugins` entry-point group (see pyproject.toml) and enabled by
`layercast serve` through `VLLM_PLUGINS`; users keep every vLLM route and flag. Also installs the
middlewares of `rpc.server.middleware` (the admin guard: bearer auth before any body byte is read, then
the body limit, 413; the generation gate: 503 while the model
is torn, no generation while a sync is applied, responses tagged with their weights version), records
every sync in layercast's Prometheus metrics (served by vLLM's `/metrics`) and makes the `layercast`
logger print its per-sync lines next to vLLM's own (unless logging was configured otherwise).
"""

from __future__ import annotations

import logging
import os
from argparse import Namespace
from typing import Any

from fastapi import FastAPI

from configs.api import WeightsStatus
from inference_worker.dry_run import VllmDryRun
from inference_worker.engine_backend import VllmSyncBackend
from inference_worker.metrics import default_metrics
from rpc.errors import NotReady
from rpc.server.health import HealthGuard
from rpc.server.middleware import AdminGuard, GenerationGate
from rpc.server.routes import build_router
from rpc.server.weights_gate import WeightsGate

PLUGIN_NAME = "layercast"
TOKEN_ENV = "LAYERCAST_ADMIN_TOKEN"
LOG_FORMAT = "%(levelname)s %(asctime)s [%(name)s] %(message)s"


def configure_logging() -> None:
    """INFO lines of the `layercast` loggers to stderr, as vLLM does for its own, unless the user
    configured them (a handler is already there) or turned vLLM's logging setup off."""
    root = logging.getLogger("layercast")
    if root.handlers or os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0":
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


class LayercastEndpointPlugin:
    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.backend: VllmSyncBackend | None = None
        self.dry_run: VllmDryRun | None = None
        self.gate = WeightsGate()

    def _backend(self) -> VllmSyncBackend:
        if self.backend is None:
            raise NotReady("the engine is not up yet")
        return self.backend

    def _dry_run(self) -> VllmDryRun:
        if self.dry_run is None:
            raise NotReady("the engine is not up yet")
        return self.dry_run

    def _status(self) -> WeightsStatus | None:
        return self.backend.status() if self.backend is not None else None

    def _health_problem(self) -> str | None:
        return self.backend.health_problem() if self.backend is not None else None

    def attach_router(self, app: FastAPI) -> None:
        configure_logging()
        before = len(app.router.routes)
        token = os.environ.get(TOKEN_ENV) or None
        router = build_router(
            self._backend,
            token,
            observers=[default_metrics().observe],
            get_checker=self._dry_run,
            gate=self.gate,
        )
        app.include_router(router)
        # Starlette takes the first matching route: put ours first, so that with VLLM_SERVER_DEV_MODE=1
        # layercast's /update_weights wins over vLLM's weight-transfer route of the same path (its
        # /pause, /resume and the rest stay available).
        ours = app.router.routes[before:]
        del app.router.routes[before:]
        app.router.routes[:0] = ours
        app.add_middleware(GenerationGate, gate=self.gate, status=self._status)
        app.add_middleware(HealthGuard, problem=self._health_problem)
        app.add_middleware(AdminGuard, token=token)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is not None:
            backend = VllmSyncBackend(engine_client)
            self.backend = backend
            self.dry_run = VllmDryRun(backend.rpc, backend.status)
