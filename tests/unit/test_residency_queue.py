"""Admission: a cold adapter is loaded (add_lora) before its request goes on, concurrent requests
share that load, a load vLLM refuses fails only the requests waiting on it; when every loaded
adapter is busy, wait for one to go idle (as vLLM's queue would hold the request), refuse at once
only when pins alone fill the cache."""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.residency import AdapterCacheFull, Residency, ResidencyManager
from server.errors import AdapterLoadFailed


class Engine:
    """Stands in for vLLM's add/remove: the residency logic is what is under test."""

    def __init__(self, refuse: set[str] = frozenset(), delay: float = 0.0):
        self.added: list[int] = []
        self.removed: list[int] = []
        self.refuse, self.delay = refuse, delay

    async def add_lora(self, name, lora_id, path):
        await asyncio.sleep(self.delay)
        if path in self.refuse:
            raise RuntimeError(f"Missing required configuration fields: {{'lora_alpha'}} ({path})")
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
        # b is in the engine before its request goes on; a left it.
        assert engine.added == [a.lora_id, b.lora_id] and engine.removed == [a.lora_id]
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


def test_a_warm_up_that_needs_a_busy_adapter_gone_is_refused_at_once():
    """/v1/load_lora_adapter and uploads warm the cache with wait=False: they must not hang on traffic."""
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=10, max_entries=1, admission_timeout_s=60)
        a = await r.acquire("t/a@1", "/a", 1)
        with pytest.raises(AdapterCacheFull):
            await asyncio.wait_for(r.acquire("t/b@1", "/b", 1, wait=False), 1)
        assert r.get("t/b@1") is None and r.get("t/a@1") is a  # nothing admitted, nothing evicted
        assert not r.adopt("t/b@1", 99, "/b", 1)  # nor taken in
        r.release(a)
        b = await r.acquire("t/b@1", "/b", 1, wait=False)  # idle now: a makes room at once
        await asyncio.sleep(0)
        assert engine.added == [a.lora_id, b.lora_id] and engine.removed == [a.lora_id]
        r.release(b)

    asyncio.run(main())


def test_concurrent_requests_share_one_load_and_a_refused_load_fails_only_its_requests():
    async def main():
        engine = Engine(refuse={"/bad"}, delay=0.05)
        r = ResidencyManager(engine, budget_bytes=100, max_entries=4)
        good = await asyncio.gather(*(r.acquire("t/good@1", "/good", 1) for _ in range(5)))
        assert len({id(e) for e in good}) == 1 and good[0].refs == 5 and engine.added == [good[0].lora_id]
        bad = await asyncio.gather(*(r.acquire("t/bad@1", "/bad", 1) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, AdapterLoadFailed) for e in bad)
        assert "'bad' could not be loaded" in bad[0].message and "lora_alpha" in bad[0].message
        assert bad[0].field == "model"
        assert r.get("t/bad@1") is None  # nothing half-admitted: the next request tries again
        assert r.get("t/good@1").state is Residency.LOADED and r.get("t/good@1").refs == 5
        for e in good:
            r.release(e)

    asyncio.run(main())


def test_a_version_retired_while_it_loads_leaves_once_loaded_and_idle():
    async def main():
        engine = Engine(delay=0.05)
        r = ResidencyManager(engine, budget_bytes=100, max_entries=4)
        drained = []
        r.on_drained = drained.append
        task = asyncio.create_task(r.acquire("t/a@1", "/a", 1, digest="d" * 64))
        await asyncio.sleep(0.01)
        assert r.get("t/a@1").state is Residency.LOADING and r.digests() == {"d" * 64}
        await r.retire("t/a@1")
        entry = await task  # the request still gets its adapter
        assert entry.state is Residency.DRAINING
        r.release(entry)
        await asyncio.sleep(0.01)
        assert r.get("t/a@1") is None and engine.removed == [entry.lora_id] and drained == ["t/a@1"]
        assert r.digests() == set()

    asyncio.run(main())


def test_adopt_takes_in_an_adapter_already_loaded():
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=100, max_entries=2)
        lora_id = r.new_lora_id()
        assert r.adopt("t/a@1", lora_id, "/a", 1, digest="a" * 64)
        entry = await r.acquire("t/a@1", "/a", 1)
        assert entry.lora_id == lora_id and engine.added == []  # a hit: no second load
        r.release(entry)

    asyncio.run(main())


def test_a_waiting_admission_holds_no_lock_over_other_tenants():
    """Tenant X's big cold adapter waits for room; tenant Y's small one fits now and is admitted at
    once instead of queueing behind X's wait."""
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=4, admission_timeout_s=5)
        a = await r.acquire("x/a@1", "/a", 6)  # busy
        waiting = asyncio.create_task(r.acquire("x/c@1", "/c", 6))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        d = await asyncio.wait_for(r.acquire("y/d@1", "/d", 2), 0.5)
        assert d.state is Residency.LOADED and not waiting.done()
        r.release(d)
        r.release(a)
        c = await asyncio.wait_for(waiting, 1)
        assert r.get("x/a@1") is None and c.state is Residency.LOADED
        r.release(c)

    asyncio.run(main())


def test_retiring_a_busy_adapter_admits_the_waiter_when_its_last_request_ends():
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=10, max_entries=1, admission_timeout_s=5)
        a = await r.acquire("t/a@1", "/a", 1)
        waiting = asyncio.create_task(r.acquire("t/b@1", "/b", 1))
        await asyncio.sleep(0.05)
        await r.retire("t/a@1")
        assert r.get("t/a@1").state is Residency.DRAINING and not waiting.done()
        r.release(a)
        b = await asyncio.wait_for(waiting, 0.5)
        assert r.get("t/a@1") is None and engine.removed == [a.lora_id]
        r.release(b)

    asyncio.run(main())


def test_retiring_an_idle_adapter_wakes_a_waiter_at_once():
    """A pinned, idle adapter fills the cache; a cold one waits (the pin could be lifted). Retiring
    the pinned one frees its room: the waiter goes in without waiting for its timeout."""
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=2, admission_timeout_s=5)
        a = await r.acquire("t/a@1", "/a", 6, pinned=True)
        r.release(a)
        busy = await r.acquire("t/busy@1", "/busy", 3)
        waiting = asyncio.create_task(r.acquire("t/b@1", "/b", 4))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await r.retire("t/a@1")
        b = await asyncio.wait_for(waiting, 0.5)
        assert r.get("t/a@1") is None and b.state is Residency.LOADED
        r.release(b)
        r.release(busy)

    asyncio.run(main())


def test_a_waiting_admission_keeps_its_blob_live():
    """Found by the soak: a request waiting for room has no entry yet, and its blob's grace ran
    out under it; the collector removed the files vLLM was about to load."""
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=1, admission_timeout_s=5)
        a = await r.acquire("t/a@1", "/a", 1, digest="da")
        waiting = asyncio.create_task(r.acquire("t/b@1", "/b", 1, digest="db"))
        await asyncio.sleep(0.05)
        assert r.get("t/b@1") is None and r.digests() == {"da", "db"}
        r.release(a)
        b = await asyncio.wait_for(waiting, 1)
        await asyncio.sleep(0)
        assert r.digests() == {"db"}
        r.release(b)

    asyncio.run(main())


def test_prefetch_fills_free_room_one_load_at_a_time_and_never_evicts():
    async def main():
        engine = Engine()
        gates: dict[str, asyncio.Event] = {}
        in_flight: set[str] = set()
        add = engine.add_lora

        async def gated(name, lora_id, path):  # each load waits until the test opens its gate
            in_flight.add(path)
            await gates.setdefault(path, asyncio.Event()).wait()
            in_flight.discard(path)
            await add(name, lora_id, path)

        async def settle():
            for _ in range(10):
                await asyncio.sleep(0)

        engine.add_lora = gated
        r = ResidencyManager(engine, budget_bytes=10, max_entries=4)
        gates["/a"] = asyncio.Event()
        gates["/a"].set()
        busy = await r.acquire("t/a@1", "/a", 1)
        for name in "bcde":
            r.prefetch(f"t/{name}@1", f"/{name}", 1)
        await settle()
        assert in_flight == {"/b"}  # one prefetch at a time reaches the engine
        asked = asyncio.create_task(r.acquire("t/e@1", "/e", 1))  # asked for before its turn
        await settle()
        assert in_flight == {"/b", "/e"}  # loaded for its request at once, beside the one prefetch
        gates.setdefault("/e", asyncio.Event()).set()
        assert (await asked).state is Residency.LOADED and r.get("t/c@1") is None
        r.release(busy)
        r.release(await asked)
        for g in "bcd":
            gates.setdefault(f"/{g}", asyncio.Event()).set()
        await r.prefetched()
        # b and c fit; d finds no room without evicting a, which is idle but is not pushed out
        assert sorted(e.key for e in r.entries()) == ["t/a@1", "t/b@1", "t/c@1", "t/e@1"]
        assert engine.removed == []

    asyncio.run(main())


def test_a_prefetch_vllm_refuses_leaves_nothing():
    async def main():
        r = ResidencyManager(Engine(refuse={"/bad"}), budget_bytes=10, max_entries=2)
        r.prefetch("t/bad@1", "/bad", 1)
        await r.prefetched()
        assert r.entries() == []

    asyncio.run(main())


def test_a_queued_prefetch_follows_retire_and_unpin_and_keeps_its_blob():
    async def main():
        engine = Engine()
        r = ResidencyManager(engine, budget_bytes=10, max_entries=4)
        busy = await r.acquire("t/a@1", "/a", 1)  # the prefetcher has not run yet: b and c stay queued
        r.prefetch("t/b@1", "/b", 1, digest="db", pinned=True)
        r.prefetch("t/c@1", "/c", 1, digest="dc", pinned=True)
        assert r.knows("t/b@1") and {"db", "dc"} <= r.digests()  # a queued load's blob is not reclaimed
        await r.retire("t/b@1")  # replaced or deleted before its turn: never loaded
        r.set_pinned("t/c@1", False)
        await r.prefetched()
        assert r.get("t/b@1") is None and not r.knows("t/b@1") and "db" not in r.digests()
        assert r.get("t/c@1").pinned is False
        r.release(busy)

    asyncio.run(main())


def test_a_prefetch_gives_way_to_an_admission_waiting_for_room():
    async def main():
        r = ResidencyManager(Engine(), budget_bytes=10, max_entries=1, admission_timeout_s=5)
        busy = await r.acquire("t/a@1", "/a", 1)
        waiting = asyncio.create_task(r.acquire("t/b@1", "/b", 1, digest="db"))
        await asyncio.sleep(0)
        r.release(busy)  # room for one: the waiting request's, not a prefetch's
        r.prefetch("t/c@1", "/c", 1)
        await r.prefetched()
        b = await asyncio.wait_for(waiting, 1)
        assert r.get("t/c@1") is None and b.state is Residency.LOADED
        r.release(b)

    asyncio.run(main())


def test_a_version_retired_while_its_load_fails_is_reported_drained():
    async def main():
        engine = Engine(refuse={"/a"}, delay=0.01)
        r = ResidencyManager(engine, budget_bytes=10, max_entries=2)
        drained = []
        r.on_drained = drained.append
        r.prefetch("t/a@1", "/a", 1)
        await asyncio.sleep(0)  # its load is under way
        await r.retire("t/a@1")
        await r.prefetched()
        assert drained == ["t/a@1"] and r.entries() == []

    asyncio.run(main())
