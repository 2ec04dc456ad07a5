"""`GET /health` that tells the truth about layercast: 503 with the reason while the server cannot take
part in syncs (its workers are stuck in a call past its deadline, or answer out of step, or the engine
core died), else vLLM's own `/health` answers. Engine-independent: `problem()` says what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable

from rpc.server.middleware import ASGIApp, Receive, Scope, Send, answer_json


class HealthGuard:
    def __init__(self, app: ASGIApp, problem: Callable[[], str | None]) -> None:
        self.app = app
        self.problem = problem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/health":
            problem = self.problem()
            if problem is not None:
                await answer_json(send, 503, {"error": "Unhealthy", "detail": problem}, [])
                return
        await self.app(scope, receive, send)
