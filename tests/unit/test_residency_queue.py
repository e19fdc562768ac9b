"""Admission when every loaded adapter is busy: wait for one to go idle (as vLLM's queue
would hold the request), refuse at once only when pins alone fill the cache."""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.residency import AdapterCacheFull, ResidencyManager


class Engine:
    """Stands in for vLLM's add/remove: the residency logic is what is under test."""

    def __init__(self):
        self.added: list[int] = []
        self.removed: list[int] = []

    async def add_lora(self, name, lora_id, path):
        self.added.append(lora_id)

    async def remove_lora(self, lora_id):
        self.removed.append(lora_id)


def test_a_cold_adapter_waits_for_a_busy_one_to_finish():
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=10, max_entries=1, admission_timeout_s=5)
        a = await r.acquire("t/a@1", "/a", 1)
        b_task = asyncio.create_task(r.acquire("t/b@1", "/b", 1))
        await asyncio.sleep(0.05)
        assert not b_task.done()  # a is serving: b queues instead of failing
        r.release(a)
        b = await asyncio.wait_for(b_task, 1)
        await asyncio.sleep(0)  # the eviction's remove_lora runs in the background
        assert r.get("t/a@1") is None and r.get("t/b@1") is b
        # Admission loads nothing itself (vLLM loads b in its first step); a leaves the engine.
        assert engine.added == [] and engine.removed == [a.lora_id]
        r.release(b)

    asyncio.run(main())


def test_waiting_ends_with_a_503_after_the_timeout():
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=1, admission_timeout_s=0.05)
        await r.acquire("t/a@1", "/a", 1)
        with pytest.raises(AdapterCacheFull, match="cache is full"):
            await r.acquire("t/b@1", "/b", 1)

    asyncio.run(main())


def test_pins_that_fill_the_cache_are_refused_without_waiting():
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=1, admission_timeout_s=60)
        a = await r.acquire("t/a@1", "/a", 1, pinned=True)
        r.release(a)
        r.set_pinned("t/a@1", True)
        with pytest.raises(AdapterCacheFull):
            await asyncio.wait_for(r.acquire("t/b@1", "/b", 1), 1)

    asyncio.run(main())


def test_a_preload_that_needs_a_busy_adapter_gone_is_refused_at_once():
    """/v1/load_lora_adapter warms the cache with wait=False: registering must not hang on traffic."""
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=10, max_entries=1, admission_timeout_s=60)
        a = await r.acquire("t/a@1", "/a", 1)
        with pytest.raises(AdapterCacheFull):
            await asyncio.wait_for(r.acquire("t/b@1", "/b", 1, wait=False), 1)
        assert r.get("t/b@1") is None and r.get("t/a@1") is a  # nothing admitted, nothing evicted
        r.release(a)
        b = await r.acquire("t/b@1", "/b", 1, wait=False)  # idle now: a makes room at once
        await r.preload(b)
        await asyncio.sleep(0)
        assert engine.added == [b.lora_id] and engine.removed == [a.lora_id]
        r.release(b)

    asyncio.run(main())
