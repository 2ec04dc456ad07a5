"""`inference_worker.sleep_state`: a sync is refused while vLLM's weights are asleep, allowed once they woke.

vLLM's CPU build has no sleep mode, so the engine here is a stand-in with vLLM 0.26's executor semantics
(`sleep` puts both tags to sleep; `wake_up(tags)` wakes those, `None` all; `is_sleeping()` is true until
every tag woke); the GPU run exercises the real one."""

from __future__ import annotations

import asyncio

from inference_worker.sleep_state import SleepState


class SleepyEngine:
    def __init__(self) -> None:
        self.tags: set[str] = set()

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.tags = {"weights", "kv_cache"}

    async def wake_up(self, tags: list[str] | None = None) -> None:
        self.tags = set() if tags is None else self.tags - set(tags)

    async def is_sleeping(self) -> bool:
        return bool(self.tags)


def test_weights_first_then_kv_cache() -> None:
    async def go() -> list[str | None]:
        engine = SleepyEngine()
        state = SleepState(engine)
        seen = [await state.problem()]
        await engine.sleep(1)
        seen.append(await state.problem())
        await engine.wake_up(["weights"])
        seen.append(await state.problem())  # the KV cache still asleep: a sync is right now
        await engine.wake_up(["kv_cache"])
        seen.append(await state.problem())
        await engine.sleep(2)
        await engine.wake_up(None)
        seen.append(await state.problem())
        return seen

    before, asleep, weights_up, all_up, woke_all = asyncio.run(go())
    assert before is None and weights_up is None and all_up is None and woke_all is None
    assert asleep is not None and "POST /wake_up?tags=weights" in asleep


def test_a_paused_engine_is_not_taken_for_a_sleeping_one() -> None:
    """vLLM's `is_sleeping()` is also true while generation is paused (`/pause`): a sync must go on."""

    async def go() -> str | None:
        engine = SleepyEngine()
        engine.tags = {"paused"}  # is_sleeping() answers True, no sleep went through the engine client
        return await SleepState(engine).problem()

    assert asyncio.run(go()) is None
