"""Whether vLLM's weights are asleep (sleep mode), as a sync must know it.

Colocated RL frees vLLM's GPU memory while the trainer steps: `POST /sleep`, then
`POST /wake_up?tags=weights`, a sync, then `POST /wake_up?tags=kv_cache`. vLLM's engine only says
`is_sleeping()`, which stays true until every tag woke, so it cannot tell "weights awake, KV cache asleep"
(a sync is right) from "all asleep" (a sync would write into unmapped or discarded memory). `SleepState`
wraps the engine client's own `sleep` and `wake_up` (what vLLM's `/sleep` and `/wake_up` routes call) to
know which tags are asleep.

Invariant: `problem()` is None exactly when no `sleep` was seen since `weights` last woke. The wrapper is
installed when the engine client is handed to the plugin, before any route can put the engine to sleep.
"""

from __future__ import annotations

from typing import Any

TAGS = frozenset({"weights", "kv_cache"})


class SleepState:
    def __init__(self, engine_client: Any) -> None:
        self.asleep: frozenset[str] = frozenset()
        sleep, wake_up = getattr(engine_client, "sleep", None), getattr(engine_client, "wake_up", None)
        if sleep is None or wake_up is None:
            return

        async def watched_sleep(level: int = 1, *args: Any, **kwargs: Any) -> Any:
            out = await sleep(level, *args, **kwargs)
            self.asleep = TAGS
            return out

        async def watched_wake_up(tags: list[str] | None = None, *args: Any, **kwargs: Any) -> Any:
            out = await wake_up(tags, *args, **kwargs)
            self.asleep = frozenset() if tags is None else self.asleep - set(tags)
            return out

        engine_client.sleep, engine_client.wake_up = watched_sleep, watched_wake_up

    async def problem(self) -> str | None:
        """Why a sync may not run now (the weights are asleep), or None. vLLM's own `is_sleeping()` is not
        asked: it is also true while generation is merely paused (`/pause`, `is_scheduler_paused()`), when
        a sync is exactly right."""
        if "weights" in self.asleep:
            return (
                "the engine is asleep (vLLM sleep mode) with its weights: POST /wake_up?tags=weights before "
                "a sync (the KV cache may stay asleep until after it); nothing was loaded"
            )
        return None
