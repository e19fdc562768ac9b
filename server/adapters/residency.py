"""Which adapters are in the engine, and which leave when memory runs short.

Two tiers, as in S-LoRA: vLLM holds up to ``max_loras`` adapters in GPU slots
for the running batch and swaps them in from its host-memory tier by itself.
This module owns the host tier: it decides what is *admitted* to the engine,
keeps it under a byte budget (``--adapter-cache-bytes``) and ``max_cpu_loras``
entries, and evicts the least recently used adapter that is neither pinned nor
serving a request.

- **An adapter is in the engine before any request for it is.** A cold
  adapter is loaded with ``add_lora`` and only then does its request go to
  vLLM. vLLM validates and reads the adapter in that call and returns an error
  to the caller if it fails; the same failure inside the engine's step (where
  vLLM loads an adapter it meets in a request but does not hold) kills the
  engine for every tenant. A load that fails fails the requests waiting on it,
  with :class:`~server.errors.AdapterLoadFailed` naming the adapter, and
  nothing else.
- Concurrent requests for one cold adapter share its load. The admission lock
  guards decisions only, never a load.
- Eviction sends ``remove_lora`` in the background; the request that caused it
  does not wait for it. The engine is given one host-tier slot more than this
  manager fills (``engine_max_cpu_loras``), so an admission whose eviction has
  not reached the engine yet, or an upload's validation load, never makes vLLM
  evict one of these adapters behind this manager's back.
- Every request holds a reference for its whole life; an adapter with
  references is never evicted, and a retired version (after a hot replace or
  delete) leaves the engine only once its last in-flight request finishes.
- When every admitted adapter is busy, a cold one waits for one to go idle (up
  to ``admission_timeout_s``), as vLLM's own queue would hold it. The lock is
  never held while waiting, so one tenant's cold adapters do not queue
  another's behind them.
- :meth:`adopt` takes in an adapter an upload has already loaded into the
  engine to validate it, so its first request finds it there. vLLM pins each
  cached adapter's host memory; a tier that is still filling pays a fresh
  ``cudaHostAlloc`` per cold load (83 ms against 14 ms for an 80 MiB adapter on
  an H100, benchmarks/pinned_alloc.py), so loading at registration fills it up
  front, as ``vllm serve --lora-modules`` does.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import AdapterLoadFailed, LoraplexError

logger = logging.getLogger(__name__)


class AdapterCacheFull(LoraplexError):
    """Every loaded adapter is pinned or busy and the new one does not fit."""

    type = "server_error"
    code = "adapter_cache_full"


class Residency(enum.StrEnum):
    LOADING = "loading"  # admitted; add_lora is in flight, requests wait for it
    LOADED = "loaded"  # in the engine's host tier
    DRAINING = "draining"  # retired or deleted; leaves the engine when its last request ends


HOST_TIER_SHARE = 0.5
"""The share of the host memory available at start that the host tier takes by default."""
SMALL_ADAPTER_BYTES = 16 << 20  # r=8 on q and v of an 8B model is 8 MiB in bf16
MAX_CPU_LORAS = 4096


def available_host_memory(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                          host_available: int | None = None) -> int:
    """Bytes this process may still take: the kernel's MemAvailable (``host_available``, read now
    if not given), within the memory limit of its cgroup (a container's, a Slurm job's) and of the
    cgroups above it, where one is set. Page cache the kernel can drop (``inactive_file``) does not
    count as used."""
    if host_available is None:
        import psutil

        host_available = psutil.virtual_memory().available
    available = host_available
    for d in _cgroup_dirs(cgroup_root, proc_cgroup):
        try:
            cap = (d / "memory.max").read_text().strip()
            if cap == "max":
                continue
            used = int((d / "memory.current").read_text())
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if line.strip())
            used -= int(stat.get("inactive_file", 0))
            available = min(available, int(cap) - max(used, 0))
        except (OSError, ValueError):
            continue
    return max(available, 0)


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 directory and those above it (the root's own files, in a
    container's namespace, are the container's)."""
    try:
        rel = next(line.split("::", 1)[1].strip() for line in proc_cgroup.read_text().splitlines()
                   if line.startswith("0::"))
    except (OSError, StopIteration):
        rel = "/"
    d, out = root / rel.lstrip("/"), []
    while True:
        out.append(d)
        if d == root or root not in d.parents:
            return out
        d = d.parent


def gpus_on_host() -> int:
    """Every GPU on this host, whatever CUDA_VISIBLE_DEVICES shows this process (NVML); 0 without."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library or no driver: a CPU host
        return 0


def default_host_tier_bytes(available: int, gpus_used: int, gpus_on_host: int) -> int:
    """The host tier's byte budget when ``--adapter-cache-bytes`` leaves it to loraplex: half of the
    host memory available at start, shared with the servers of the host's other GPUs (each
    single-GPU server of an 8-GPU host gets 1/16). Each tensor-parallel worker holds its own copy
    of every adapter in the tier, so the budget is per copy. An adapter held there starts serving
    without a load on the engine thread; one that is not costs every running request a pause."""
    share = HOST_TIER_SHARE * (min(1.0, gpus_used / gpus_on_host) if gpus_on_host else 1.0) / max(gpus_used, 1)
    return max(int(available * share), 256 << 20)


def default_max_cpu_loras(budget_bytes: int, max_loras: int) -> int:
    """vLLM's host-tier count when ``--max-cpu-loras`` leaves it to loraplex: as many small adapters
    (r=8 on two modules of an 8B model) as the byte budget holds. loraplex evicts by bytes; vLLM
    only caps the count, and allocates nothing for it."""
    return max(64, max_loras, min(MAX_CPU_LORAS, budget_bytes // SMALL_ADAPTER_BYTES))


def engine_max_cpu_loras(max_cpu_loras: int) -> int:
    """The host-tier size to give vLLM for a manager that fills ``max_cpu_loras``: one spare."""
    return max_cpu_loras + 1


@dataclass
class Entry:
    key: str
    """Unique per adapter *version*: tenant/name@version."""
    lora_id: int
    path: str
    size_bytes: int
    digest: str | None = None
    """The blob the engine loads from; kept on disk while this entry exists."""
    state: Residency = Residency.LOADING
    pinned: bool = False
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    load: asyncio.Future | None = None
    """Resolves when add_lora returns; every request for a LOADING entry awaits it."""

    @property
    def lora_name(self) -> str:
        # Unique per version: vLLM keys prefix-cache blocks by LoRA name and path, so a
        # replaced adapter can never be served the old version's cached KV.
        return self.key


class Events:
    """Hooks for metrics; the default does nothing."""

    def hit(self, key: str) -> None: ...
    def miss(self, key: str) -> None: ...
    def loaded(self, key: str, seconds: float) -> None: ...
    def load_failed(self, key: str) -> None: ...
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
        self._tasks: set[asyncio.Task] = set()  # background loads and removals, referenced until done
        self._prefetch: OrderedDict[str, tuple[str, int, str | None, bool]] = OrderedDict()
        """Registered versions waiting for a background load: key -> (path, size, digest, pinned)."""
        self._prefetcher: asyncio.Task | None = None
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # LRU order: oldest first
        self._waiting: Counter[str] = Counter()  # digests of cold admissions waiting for room
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # guards admission/eviction decisions, never a load
        self.on_drained: Callable[[str], None] | None = None
        """Called with a version's key once it has left the engine (eviction or retirement)."""

    # ------------------------------------------------------------ queries

    @property
    def used_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries.values() if e.state is not Residency.DRAINING or e.refs)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def knows(self, key: str) -> bool:
        """In the engine, on its way there, or queued for a background load (:meth:`prefetch`)."""
        return key in self._entries or key in self._prefetch

    def digests(self) -> set[str]:
        """Blobs vLLM may still need to read: an entry's (loading, loaded, or draining), a cold
        admission's that is still waiting for room (it has no entry yet), and a queued prefetch's."""
        return ({e.digest for e in self._entries.values() if e.digest} | {d for d, n in self._waiting.items() if n}
                | {d for _, _, d, _ in self._prefetch.values() if d})

    def new_lora_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------ request path

    async def acquire(self, key: str, path: str, size_bytes: int, *, digest: str | None = None,
                      pinned: bool = False, wait: bool = True) -> Entry:
        """Hold a reference to the adapter version, in the engine: admitted and loaded first if
        it is not. ``wait=False``: refuse at once (:class:`AdapterCacheFull`) rather than wait for
        room. Raises :class:`AdapterLoadFailed` if vLLM cannot load it."""
        entry = self._entries.get(key)
        if entry is None:
            if digest:  # a blob a waiting admission will load is not reclaimed under it
                self._waiting[digest] += 1
            try:
                entry = await self._admit(key, path, size_bytes, digest=digest, pinned=pinned, wait=wait)
            finally:
                if digest:
                    self._waiting[digest] -= 1
                    if not self._waiting[digest]:
                        del self._waiting[digest]
        else:
            self.events.hit(key)  # the hot path: no lock, no await
        entry.refs += 1
        entry.last_used = time.monotonic()
        if entry.state is not Residency.DRAINING:
            self._entries.move_to_end(key)
        if entry.state is Residency.LOADING:
            try:
                await asyncio.shield(entry.load)
            except BaseException:
                self.release(entry)
                raise
        return entry

    async def _admit(self, key: str, path: str, size_bytes: int, *, digest: str | None, pinned: bool,
                     wait: bool) -> Entry:
        """A cold adapter: evict idle ones to make room and start its load, or wait for room.

        The lock covers each decision, never a wait: while one tenant's cold adapter waits for
        a busy one to finish, another's admission (or a hit) goes ahead."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_timeout_s
        counted = False
        while True:
            async with self._lock:
                if (entry := self._entries.get(key)) is not None:  # admitted while this one waited
                    self.events.hit(key)
                    return entry
                if not counted:
                    self.events.miss(key)
                    counted = True
                self._freed.clear()  # before the check: a release after it wakes this waiter
                self._evict_for(size_bytes)
                if not self._over(size_bytes):
                    entry = Entry(key, self.new_lora_id(), path, size_bytes, digest=digest, pinned=pinned)
                    entry.load = loop.create_future()
                    self._entries[key] = entry
                    self._in_background(self._load(entry))
                    return entry
                if (not wait or self.budget_bytes < size_bytes or self._all_pinned(size_bytes)
                        or loop.time() >= deadline):
                    raise AdapterCacheFull(
                        f"adapter cache is full ({len(self._entries)} adapters, {self.used_bytes} bytes): every "
                        "loaded adapter is pinned or serving requests; retry shortly or raise "
                        "--adapter-cache-bytes / --max-cpu-loras", retry_after=1.0)
            # Every admitted adapter is serving: wait for one to finish, as vLLM's scheduler
            # would hold the request, rather than fail it at once. Not under the lock.
            try:
                await asyncio.wait_for(self._freed.wait(), deadline - loop.time())
            except TimeoutError:
                pass

    async def _load(self, entry: Entry) -> None:
        t0 = time.perf_counter()
        try:
            await self.engine.add_lora(entry.lora_name, entry.lora_id, entry.path)
        except Exception as e:
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._freed.set()
            self.events.load_failed(entry.key)
            logger.error("vLLM could not load adapter %s from %s: %s", entry.key, entry.path, e)
            name = entry.key.split("/", 1)[-1].rsplit("@", 1)[0]
            entry.load.set_exception(_load_error(e, name))
            entry.load.exception()  # retrieved here: a load nobody waits on is not an asyncio warning
            if entry.state is Residency.DRAINING and self.on_drained is not None:
                self.on_drained(entry.key)  # retired while it loaded: it has left the engine, never having entered
            return
        if entry.state is Residency.LOADING:
            entry.state = Residency.LOADED
        self.events.loaded(entry.key, time.perf_counter() - t0)
        entry.load.set_result(None)
        if entry.state is Residency.DRAINING and entry.refs == 0:  # retired while it loaded
            await self._unload(entry)

    def release(self, entry: Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0:
            if entry.state is Residency.DRAINING and (entry.load is None or entry.load.done()):
                self._in_background(self._unload(entry))
            self._freed.set()

    def adopt(self, key: str, lora_id: int, path: str, size_bytes: int, *, digest: str | None = None,
              pinned: bool = False, load_seconds: float | None = None) -> bool:
        """Take in an adapter already in the engine under ``lora_id`` (an upload loaded it to
        validate it, in ``load_seconds``) if it fits without waiting, evicting idle ones as
        usual. False: it does not fit; the caller removes it from the engine."""
        if key in self._entries or not self._room_now(size_bytes):
            return False
        self._evict_for(size_bytes)
        entry = Entry(key, lora_id, path, size_bytes, digest=digest, state=Residency.LOADED, pinned=pinned)
        self._entries[key] = entry
        if load_seconds is not None:
            self.events.loaded(key, load_seconds)
        return True

    def prefetch(self, key: str, path: str, size_bytes: int, *, digest: str | None = None,
                 pinned: bool = False) -> None:
        """Load an adapter no request has asked for yet, once the host tier has room for it
        without evicting anything: registered adapters fill the tier up front, as ``vllm serve
        --lora-modules`` does, and never push out one that is in use. One such load at a time
        reaches the engine, so that a registration's validation load or a request's cold load
        waits behind at most one of them, not behind every adapter just registered. An adapter
        a request asks for first is loaded for it as usual."""
        self._prefetch[key] = (path, size_bytes, digest, pinned)
        if self._prefetcher is None or self._prefetcher.done():
            self._prefetcher = asyncio.get_running_loop().create_task(self._prefetch_all())
            self._tasks.add(self._prefetcher)
            self._prefetcher.add_done_callback(self._tasks.discard)

    async def prefetched(self) -> None:
        """Until every adapter queued by :meth:`prefetch` has loaded, or found no room."""
        while self._prefetcher is not None and not self._prefetcher.done():
            await asyncio.shield(self._prefetcher)

    async def _prefetch_all(self) -> None:
        while self._prefetch:
            key, (path, size_bytes, digest, pinned) = self._prefetch.popitem(last=False)
            if key in self._entries or self._over(size_bytes) or self._waiting:
                continue  # asked for meanwhile, or its room is wanted: it loads on first use
            entry = Entry(key, self.new_lora_id(), path, size_bytes, digest=digest, pinned=pinned)
            entry.load = asyncio.get_running_loop().create_future()
            self._entries[key] = entry
            await self._load(entry)
            self._freed.set()  # idle once loaded: an admission waiting for room may take its place

    def _in_background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _over(self, size_bytes: int) -> bool:
        return (len(self._entries) + 1 > self.max_entries
                or sum(e.size_bytes for e in self._entries.values()) + size_bytes > self.budget_bytes)

    def _victim(self) -> Entry | None:
        return next((e for e in self._entries.values()
                     if e.state is Residency.LOADED and not e.pinned and e.refs == 0), None)

    def _room_now(self, size_bytes: int) -> bool:
        """Whether evicting idle, unpinned adapters alone makes room for ``size_bytes``."""
        idle = [e for e in self._entries.values() if e.state is Residency.LOADED and not e.pinned and e.refs == 0]
        rest = [e for e in self._entries.values() if e not in idle]
        return len(rest) + 1 <= self.max_entries and sum(e.size_bytes for e in rest) + size_bytes <= self.budget_bytes

    def _evict_for(self, size_bytes: int) -> None:
        while self._over(size_bytes) and (victim := self._victim()) is not None:
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
        self._freed.set()  # its room is free now: wake the admissions waiting for room
        await self._remove(entry)

    async def _remove(self, entry: Entry) -> None:
        try:
            await self.engine.remove_lora(entry.lora_id)
        except Exception:  # the engine may have dropped it already, or died
            logger.warning("removing adapter %s from the engine failed", entry.key, exc_info=True)
        if self.on_drained is not None:
            self.on_drained(entry.key)

    # ------------------------------------------------------------ management

    async def retire(self, key: str) -> None:
        """Take a version out of service: immediately if idle, else after its last request."""
        self._prefetch.pop(key, None)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.state = Residency.DRAINING
        if entry.refs == 0 and (entry.load is None or entry.load.done()):
            await self._unload(entry)

    async def unload_if_idle(self, key: str) -> None:
        """Ray Serve evicted the version from its multiplexed cache: unload it unless a request
        is using it, it is pinned, or it is loading."""
        entry = self._entries.get(key)
        if entry is None or entry.pinned or entry.refs or (entry.load is not None and not entry.load.done()):
            return
        await self._unload(entry)

    def set_pinned(self, key: str, pinned: bool) -> None:
        if (queued := self._prefetch.get(key)) is not None:
            self._prefetch[key] = (*queued[:3], pinned)
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.pinned = pinned
        # Deliberately not vLLM's pin_lora: it pins a *GPU slot* too, and with
        # every slot pinned the engine dies on the next other adapter ("All
        # items are pinned"). Pinning here means: never evicted from the host
        # tier. vLLM itself never evicts from that tier, because this manager
        # keeps it under engine_max_cpu_loras entries.

    def reset(self) -> None:
        """The engine restarted empty: forget every entry. Loads in flight fail with the engine."""
        self._entries.clear()
        self._prefetch.clear()
        self._freed.set()


def _load_error(e: Exception, name: str) -> LoraplexError:
    if isinstance(e, LoraplexError):  # the engine died meanwhile (EngineNotReady), say so
        return e
    return AdapterLoadFailed(f"adapter {name!r} could not be loaded: vLLM refused it ({e})", field="model")
