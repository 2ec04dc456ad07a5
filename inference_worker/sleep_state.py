"""Whether vLLM's weights are asleep (sleep mode), as a sync must know it.

Colocated RL frees vLLM's GPU memory while the trainer steps: `POST /sleep`, then
`POST /wake_up?tags=weights`, a sync, then `POST /wake_up?tags=kv_cache`. vLLM's engine only says
`is_sleeping()`, which stays true until every tag woke, so it cannot tell "weights awake, KV cache asleep"
(a sync is right) from "all asleep" (a sync would write into unmapped or discarded memory). `SleepState`
wraps the engine client's own `sleep` and `wake_up` (what vLLM's `/sleep` and `/wake_up` routes call) to
know which tags are asleep.

Invariant: `problem()` is None only when the weights are awake: no tag seen asleep, or `weights` woken since
the last sleep, or the engine says it is not sleeping at all.
"""

from __future__ import annotations

from typing import Any

TAGS = frozenset({"weights", "kv_cache"})


class SleepState:
    def __init__(self, engine_client: Any) -> None:
        self._engine = engine_client
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
        """Why a sync may not run now (the weights are asleep), or None."""
        if "weights" in self.asleep:
            return (
                "the engine is asleep (vLLM sleep mode) with its weights: POST /wake_up?tags=weights before "
                "a sync (the KV cache may stay asleep until after it); nothing was loaded"
            )
        if not self.asleep:
            is_sleeping = getattr(self._engine, "is_sleeping", None)
            if is_sleeping is not None and await is_sleeping():
                return (
                    "the engine is asleep (vLLM sleep mode, put to sleep before layercast could watch which "
                    "tags): POST /wake_up before a sync; nothing was loaded"
                )
        return None
