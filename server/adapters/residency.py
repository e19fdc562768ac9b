"""Which adapters are in the engine, and which leave when memory runs short.

Two tiers, as in S-LoRA: vLLM holds up to ``max_loras`` adapters in GPU slots
for the running batch and swaps them in from its host-memory tier by itself.
This module owns the host tier: it decides what is *admitted* to the engine,
keeps it under a byte budget (``--adapter-cache-bytes``) and ``max_cpu_loras``
entries, and evicts the least recently used adapter that is neither pinned nor
serving a request.

- Admission does not load anything: the request carries the adapter's path in
  its ``LoRARequest``, and vLLM's worker loads it inside the step that first
  schedules it, as raw vLLM does. An explicit ``add_lora`` per cold adapter is
  a round trip to the engine core that blocks its step loop, and serialised
  behind one lock it cut throughput at 256-1000 adapters on an H100 to 0.56x of
  raw vLLM (benchmarks/results/h100/bf16/before-fix-*).
- Eviction sends ``remove_lora`` in the background; the request that caused it
  does not wait for it.
- Every request holds a reference for its whole life; an adapter with
  references is never evicted, and a retired version (after a hot replace or
  delete) leaves the engine only once its last in-flight request finishes.
- When every admitted adapter is busy, a cold one waits for one to go idle (up
  to ``admission_timeout_s``), as vLLM's own queue would hold it.
- :meth:`preload` is the explicit load, for pins and for vLLM's
  ``/v1/load_lora_adapter`` (which loads at registration, as vLLM does). vLLM pins
  each cached adapter's host memory; a tier that is still filling pays a fresh
  ``cudaHostAlloc`` per cold load (83 ms against 14 ms for an 80 MiB adapter on an
  H100, benchmarks/pinned_alloc.py), so loading at registration fills it up front.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from server.errors import LoraplexError

logger = logging.getLogger(__name__)


class AdapterCacheFull(LoraplexError):
    """Every loaded adapter is pinned or busy and the new one does not fit."""

    type = "server_error"
    code = "adapter_cache_full"


class Residency(enum.StrEnum):
    LOADED = "loaded"  # admitted: vLLM loads it (if it has not yet) in the next step that needs it
    DRAINING = "draining"  # retired or deleted; leaves the engine when its last request ends


@dataclass
class Entry:
    key: str
    """Unique per adapter *version*: tenant/name@version."""
    lora_id: int
    path: str
    size_bytes: int
    state: Residency = Residency.LOADED
    pinned: bool = False
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    """Set until the first token after admission: the cold start is measured to there."""

    @property
    def lora_name(self) -> str:
        # Unique per version: vLLM keys prefix-cache blocks by LoRA, so a replaced
        # adapter can never be served the old version's cached KV.
        return self.key


class Events:
    """Hooks for metrics; the default does nothing."""

    def hit(self, key: str) -> None: ...
    def miss(self, key: str) -> None: ...
    def loaded(self, key: str, seconds: float) -> None: ...
    def evicted(self, key: str) -> None: ...


class ResidencyManager:
    def __init__(self, engine, *, budget_bytes: int, max_entries: int, events: Events | None = None,
                 admission_timeout_s: float = 30.0):
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self.events = events or Events()
        self.admission_timeout_s = admission_timeout_s
        """How long a cold adapter waits for room while every loaded one is busy, like a request
        waiting in vLLM's queue, before it is refused with :class:`AdapterCacheFull`."""
        self._freed = asyncio.Event()  # set whenever an adapter becomes idle (evictable)
        self._tasks: set[asyncio.Task] = set()  # background removals, referenced until done
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # guards admission/eviction decisions, not the loads themselves

    # ------------------------------------------------------------ queries

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries.values() if e.state is not Residency.DRAINING or e.refs)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    # ------------------------------------------------------------ request path

    async def acquire(self, key: str, path: str, size_bytes: int, *, pinned: bool = False,
                      wait: bool = True) -> Entry:
        """Admit the adapter version to the engine (if it is not) and hold a reference to it.
        ``wait=False``: refuse at once (:class:`AdapterCacheFull`) rather than wait for room."""
        entry = self._entries.get(key)
        if entry is None:
            async with self._lock:  # admissions and evictions in arrival order
                entry = self._entries.get(key)
                if entry is None:
                    self.events.miss(key)
                    await self._make_room(size_bytes, wait=wait)
                    entry = Entry(key, next(self._ids), path, size_bytes, pinned=pinned,
                                  admitted_at=time.perf_counter())
                    self._entries[key] = entry
                else:
                    self.events.hit(key)
        else:
            self.events.hit(key)  # the hot path: no lock, no await
        entry.refs += 1
        entry.last_used = time.monotonic()
        if entry.state is Residency.LOADED:
            self._entries.move_to_end(key)
        return entry

    def first_token(self, entry: Entry) -> None:
        """The engine produced a token with this adapter: after admission, that ends its cold start."""
        if entry.admitted_at is not None:
            self.events.loaded(entry.key, time.perf_counter() - entry.admitted_at)
            entry.admitted_at = None

    def release(self, entry: Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0:
            if entry.state is Residency.DRAINING:
                self._in_background(self._unload(entry))
            self._freed.set()

    async def preload(self, entry: Entry) -> None:
        """Load now rather than at first use (pinning does this): an explicit engine round trip."""
        t0 = time.perf_counter()
        await self.engine.add_lora(entry.lora_name, entry.lora_id, entry.path)
        if entry.admitted_at is not None:
            self.events.loaded(entry.key, time.perf_counter() - t0)
            entry.admitted_at = None

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _make_room(self, size_bytes: int, *, wait: bool = True) -> None:
        """Evict LRU idle, unpinned adapters until one of size_bytes fits. Caller holds the lock,
        so cold admissions queue behind this one in arrival order; warm hits never take the lock."""
        def over() -> bool:
            live = [e for e in self._entries.values()]
            return (len(live) + 1 > self.max_entries
                    or sum(e.size_bytes for e in live) + size_bytes > self.budget_bytes)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_timeout_s
        while over():
            victim = next((e for e in self._entries.values()
                           if e.state is Residency.LOADED and not e.pinned and e.refs == 0), None)
            if victim is None:
                if (not wait or self.budget_bytes < size_bytes or self._all_pinned(size_bytes)
                        or loop.time() >= deadline):
                    raise AdapterCacheFull(
                        f"adapter cache is full ({len(self._entries)} adapters, {self.used_bytes} bytes): every "
                        "loaded adapter is pinned or serving requests; retry shortly or raise "
                        "--adapter-cache-bytes / --max-cpu-loras")
                # Every admitted adapter is serving: wait for one to finish, as vLLM's
                # scheduler would hold the request, rather than fail it at once.
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), deadline - loop.time())
                except TimeoutError:
                    pass
                continue
            del self._entries[victim.key]
            self.events.evicted(victim.key)
            self._in_background(self._remove(victim))

    def _all_pinned(self, size_bytes: int) -> bool:
        """Pins alone leave no room: waiting cannot help."""
        pinned = [e for e in self._entries.values() if e.pinned]
        return (len(pinned) + 1 > self.max_entries
                or sum(e.size_bytes for e in pinned) + size_bytes > self.budget_bytes)

    async def _unload(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        await self._remove(entry)

    async def _remove(self, entry: Entry) -> None:
        try:
            await self.engine.remove_lora(entry.lora_id)
        except Exception:  # the engine may never have loaded it, or dropped it already
            logger.warning("removing adapter %s from the engine failed", entry.key, exc_info=True)

    # ------------------------------------------------------------ management

    async def retire(self, key: str) -> None:
        """Take a version out of service: immediately if idle, else after its last request."""
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.state = Residency.DRAINING
        if entry.refs == 0:
            await self._unload(entry)

    def set_pinned(self, key: str, pinned: bool) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.pinned = pinned
        # Deliberately not vLLM's pin_lora: it pins a *GPU slot* too, and with
        # every slot pinned the engine dies on the next other adapter ("All
        # items are pinned"). Pinning here means: never evicted from the host
        # tier. vLLM itself never evicts from that tier, because this manager
        # keeps it at or under max_cpu_loras entries.
