"""The adapter service: upload, replace, delete, pin -- and what keeps the store honest.

An upload goes: bytes into a staging directory as they arrive
(:class:`~server.adapters.staging.StagedUpload`) -> loraplex's own rules
(``validate``: config, manifest, tensors) -> **vLLM loads it** (``add_lora`` of
the staged directory, under a spare host-tier slot: vLLM's ``PEFTHelper`` and
loader decide, on whichever vLLM line is installed, and a refusal comes back as
a 400 instead of killing the engine in a later step) -> the blob is renamed into
the store -> the row is committed -> the loaded adapter is kept as the new
version's cache entry. Any failure undoes what came before it.

What is reclaimed, and when:

- A replaced version is RETIRED; once its last in-flight request ends, its row
  is dropped and its blob released. 1000 replaces leave one version.
- A blob is deleted only when no row refers to it, no cache entry may still
  load it, and its grace period (``--adapter-gc-grace-s``, from the delete or
  retirement that released it) has passed. The grace covers a request that
  resolved the old version just before it went.
- :func:`recover` runs at start and repairs what a crash
  (``kill -9`` anywhere in an upload) can leave: staging directories, blobs no
  row refers to, rows whose blob is gone, retired rows with nothing in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from server import failpoints
from server.adapters.registry import AdapterRecord, AdapterRegistry
from server.adapters.residency import ResidencyManager
from server.adapters.staging import StagedUpload, copy_dir
from server.adapters.uploads import UploadSlots, check_upload
from server.adapters.store import AdapterStore
from server.adapters.upload import AdapterInfo, BaseSpec, UploadFile, feed, validate
from server.config import Settings
from server.errors import AdapterRejected, InvalidArgument, PermissionDenied, QuotaExceeded
from server.tenants.store import Principal, TenantStore

logger = logging.getLogger(__name__)

ACCEPTED_DIGESTS = 4096
"""Verdicts remembered: (tenant, digest) of content that passed loraplex's rules and vLLM's loader
in this process, so that registering the same bytes again (a platform's many copies of one adapter, an
upload retried) costs a hash and a row."""


class AdapterService:
    def __init__(self, settings: Settings, *, base_spec: BaseSpec, engine, tenants: TenantStore,
                 registry: AdapterRegistry, store: AdapterStore, residency: ResidencyManager,
                 namespace: Callable[[Principal, str | None], str]):
        self.settings = settings
        self.base_spec = base_spec
        self.engine = engine
        self.tenants = tenants
        self.registry = registry
        self.store = store
        self.residency = residency
        self.namespace = namespace
        self.gc_grace_s = settings.adapter_gc_grace_s
        self._store_lock = asyncio.Lock()  # put + register, and gc: a blob is never live-but-unregistered
        self._validate_lock = asyncio.Lock()  # one validation load at a time: the engine has one spare slot
        self._accepted: OrderedDict[tuple[str, str], AdapterInfo] = OrderedDict()  # (tenant, digest) -> verdict
        self._judging: dict[tuple[str, str], asyncio.Future] = {}  # being validated now, awaited by copies
        self._retiring: dict[str, AdapterRecord] = {}  # replaced versions still serving requests
        self._tasks: set[asyncio.Task] = set()  # reclaims in flight, referenced until done
        self.uploads = UploadSlots(settings, store.free_bytes)
        self.on_change = None
        """Awaited after each write (Service.refresh): the snapshot requests read from is reloaded
        off the event loop before the write's response, not by the next request."""
        residency.on_drained = self._drained

    # ------------------------------------------------------------ upload

    def check_upload(self, principal: Principal, name: str, tenant: str | None, *, replace: bool) -> str:
        """Refuse what the registry would refuse, before any bytes are read; returns the namespace."""
        return check_upload(self.registry, self.tenants, principal, name, tenant, replace=replace)

    @asynccontextmanager
    async def staging(self, principal: Principal, *, max_bytes: int | None = None, reserve: int | None = None,
                      field: str = "files") -> AsyncIterator[StagedUpload]:
        """A :class:`StagedUpload` in a fresh staging directory, removed on exit unless stored.
        Bounded before a byte is read (:class:`~server.adapters.uploads.UploadSlots`): uploads at
        once, and the disk space this one may fill, ``reserve`` (default: an archive and what it
        unpacks to, each up to ``max_bytes``)."""
        max_bytes = max_bytes or self.settings.max_upload_bytes
        with self.uploads.hold(principal, reserve=2 * max_bytes if reserve is None else reserve, field=field):
            with self.store.staging_dir() as path:
                staged = StagedUpload(path, max_bytes=max_bytes)
                try:
                    yield staged
                finally:
                    staged.abort()

    async def add(self, principal: Principal, name: str, staged: StagedUpload, *, tenant: str | None = None,
                  replace: bool = False, refusal_field: str = "files") -> AdapterRecord:
        """Validate, have vLLM load, store and register a staged upload; on any failure nothing is kept.

        Content this process has already seen pass loraplex's rules and vLLM's loader for the same
        tenant (the same digest: the same bytes, the same verdict) skips both, and with them the engine: it is
        stored and registered at once, and loaded into the host tier in the background where
        there is room without evicting anything."""
        ns = self.check_upload(principal, name, tenant, replace=replace)
        t0 = time.perf_counter()
        # File work (unpack, hash, parse, scan the tensors) runs in a worker thread: an upload
        # of hundreds of MB must not stall the streams being served.
        digest = await asyncio.to_thread(staged.finish)
        t_hash = time.perf_counter()
        verdict = (ns, digest)  # per tenant: no tenant can time whether another sent these bytes
        info, judging = await self._verdict(verdict)
        known = info is not None
        try:
            if not known:
                info = await asyncio.to_thread(validate, staged.dir, self.base_spec,
                                               max_rank=self.settings.max_lora_rank)
            t_validate = time.perf_counter()
            self._check_rank(principal, ns, info)
            # The engine has one spare host-tier slot: one validation load at a time, held until
            # the loaded adapter is adopted as the new version's cache entry or dropped.
            async with contextlib.nullcontext() if known else self._validate_lock:
                t_engine = time.perf_counter()
                lora_id = None if known else await self._validate_in_engine(staged.dir, refusal_field)
                load_seconds = time.perf_counter() - t_engine
                if not known:
                    self._accept(verdict, info, judging)
                t_store = time.perf_counter()
                try:
                    new, old = await self._store_and_register(principal, ns, name, staged, digest, info, replace)
                except BaseException:
                    if lora_id is not None:
                        await self._drop_from_engine(lora_id)
                    raise
                path = str(self.store.path(digest))
                if known:
                    self.residency.prefetch(new.key, path, new.size_bytes, digest=digest, pinned=new.pinned)
                elif not self.residency.adopt(new.key, lora_id, path, new.size_bytes, digest=digest,
                                              pinned=new.pinned, load_seconds=load_seconds):
                    await self._drop_from_engine(lora_id)  # no room without waiting: it loads on first use
        finally:
            if judging is not None:
                self._judged(verdict, judging)
        logger.info("registered %s in %.2f s (hash %.2f, rules %.2f, vLLM %.2f, store %.2f)%s", new.key,
                    time.perf_counter() - t0, t_hash - t0, t_validate - t_hash, 0.0 if known else load_seconds,
                    time.perf_counter() - t_store, "; content already accepted" if known else "")
        return await self._committed(new, old)

    async def _register_stored(self, principal: Principal, ns: str, name: str, digest: str, *,
                               replace: bool) -> AdapterRecord | None:
        """Register content that this tenant's registrations already passed (``digest``, as
        :meth:`StagedUpload.finish` gives it) against the blob the store holds: no bytes copied,
        judged or loaded through the engine. None when this process has no verdict for it or the
        blob is gone; then it goes the whole way, through :meth:`add`."""
        info = self._accepted.get((ns, digest))
        if info is None:
            return None
        self._check_rank(principal, ns, info)
        t0 = time.perf_counter()
        async with self._store_lock:  # this server's gc takes it too, and the others' see the blob fresh
            if not await asyncio.to_thread(self.store.touch, digest):
                return None
            new, old = await asyncio.to_thread(self._write_row, principal, ns, name, digest, info, replace)
        failpoints.hit("upload.committed")
        if (path := self.store.path(digest)).is_dir():  # a shared store's local copy may be gone: then on first use
            self.residency.prefetch(new.key, str(path), new.size_bytes, digest=digest, pinned=new.pinned)
        logger.info("registered %s in %.2f s; content already stored, nothing copied", new.key,
                    time.perf_counter() - t0)
        return await self._committed(new, old)

    async def _committed(self, new: AdapterRecord, old: AdapterRecord | None) -> AdapterRecord:
        if old is not None:
            await self._retire(old)
        await self.changed()
        return new

    def _knows(self, ns: str) -> bool:
        """Whether any content this tenant registered has a verdict in this process."""
        return any(tenant == ns for tenant, _ in self._accepted)

    def _check_rank(self, principal: Principal, ns: str, info: AdapterInfo) -> None:
        quota_rank = self._quotas(principal, ns).max_rank
        if info.rank > quota_rank:
            raise QuotaExceeded(f"the adapter's rank is {info.rank}; tenant {ns!r}'s quota allows rank "
                                f"{quota_rank} at most", field="r")

    async def _verdict(self, key: tuple[str, str]) -> tuple[AdapterInfo | None, asyncio.Future | None]:
        """What validation found for this content (``key``: the tenant and the digest), if this
        process knows: ``(info, None)``.
        Content another registration is judging right now waits for that verdict (copies of one
        adapter registered at once are judged once). Otherwise ``(None, judging)``: this
        registration judges it, and must pass ``judging`` to :meth:`_accept` or :meth:`_judged`."""
        while True:
            if (info := self._accepted.get(key)) is not None:
                return info, None
            pending = self._judging.get(key)
            if pending is None:
                judging = asyncio.get_running_loop().create_future()
                self._judging[key] = judging
                return None, judging
            await asyncio.shield(pending)  # refused or failed: the next turn judges this copy itself

    def _accept(self, key: tuple[str, str], info: AdapterInfo, judging: asyncio.Future | None) -> None:
        self._accepted[key] = info
        while len(self._accepted) > ACCEPTED_DIGESTS:
            self._accepted.popitem(last=False)
        if judging is not None:
            self._judged(key, judging)

    def _judged(self, key: tuple[str, str], judging: asyncio.Future) -> None:
        """The judging of this content ended (accepted, refused, or cut short): wake the copies
        that wait on it."""
        if self._judging.get(key) is judging:
            del self._judging[key]
        if not judging.done():
            judging.set_result(None)

    async def _store_and_register(self, principal: Principal, ns: str, name: str, staged: StagedUpload, digest: str,
                                  info, replace: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        """The blob into the store and the row into the registry, as one step: a refused row
        takes a blob no one else uses with it."""
        async with self._store_lock:
            existed = await asyncio.to_thread(self.store.exists, digest)
            await asyncio.to_thread(self.store.put, staged.dir, digest=digest)
            failpoints.hit("upload.blob_stored")
            try:
                new, old = await asyncio.to_thread(self._write_row, principal, ns, name, digest, info, replace)
            except BaseException:
                if not existed and digest not in self._live():
                    await asyncio.to_thread(self.store.delete, digest)
                raise
        failpoints.hit("upload.committed")
        return new, old

    def _write_row(self, principal: Principal, ns: str, name: str, digest: str, info: AdapterInfo,
                   replace: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        if replace:
            return self.registry.replace(ns, name, digest, info)
        return self.registry.add(ns, name, digest, info, max_adapters=self._quotas(principal, ns).max_adapters), None

    async def upload(self, principal: Principal, name: str, *, files: list[UploadFile] | None = None,
                     tarball: bytes | None = None, tenant: str | None = None, replace: bool = False) -> AdapterRecord:
        """:meth:`add` for an upload already in memory (tools and tests)."""
        self.check_upload(principal, name, tenant, replace=replace)
        async with self.staging(principal) as staged:
            await asyncio.to_thread(feed, staged, files, tarball)
            return await self.add(principal, name, staged, tenant=tenant, replace=replace)

    async def _validate_in_engine(self, path: Path, field: str) -> int:
        """vLLM loads the staged adapter (its checks, its loader) into the spare slot: the id."""
        from server.engine.vllm_engine import LoraLoadError

        lora_id = self.residency.new_lora_id()
        try:
            await self.engine.add_lora(f"validate-{lora_id}", lora_id, str(path))
        except LoraLoadError as e:
            raise AdapterRejected(f"vLLM refused the adapter: {e}", field=field) from None
        return lora_id

    async def _drop_from_engine(self, lora_id: int) -> None:
        try:
            await self.engine.remove_lora(lora_id)
        except Exception:
            logger.warning("removing validation load %d from the engine failed", lora_id, exc_info=True)

    def _quotas(self, principal: Principal, ns: str):
        return self.tenants.quotas_for(principal, ns)

    async def load_from_path(self, principal: Principal, name: str, path: str, tenant: str | None = None, *,
                             replace: bool = False) -> AdapterRecord:
        """vLLM's /v1/load_lora_adapter: admins only, and only from --lora-roots. ``replace``
        (vLLM's ``load_inplace``): a new version of an adapter that exists."""
        if not principal.is_admin:
            raise PermissionDenied("loading adapters from server paths needs an admin key", field="lora_path")
        if not isinstance(path, str) or "\0" in path:
            raise InvalidArgument("lora_path must be a path without NUL bytes", field="lora_path")
        roots = [r.resolve() for r in self.settings.lora_roots]
        try:
            real = Path(path).resolve()
            inside = any(real.is_relative_to(r) for r in roots)
            is_dir = inside and real.is_dir()
        except OSError as e:  # a name too long, a loop of links ...
            raise InvalidArgument(f"lora_path is not a usable path ({e.strerror})", field="lora_path") from None
        if not inside:
            raise PermissionDenied(f"lora_path must be under one of the configured --lora-roots "
                                   f"({', '.join(map(str, roots)) or 'none configured'})", field="lora_path")
        if not is_dir:
            raise InvalidArgument(f"lora_path {path!r} is not a directory", field="lora_path")
        ns = self.namespace(principal, tenant)
        replace = replace and self.registry.find(ns, name) is not None
        self.check_upload(principal, name, tenant, replace=replace)
        if self._knows(ns):  # a copy of content already accepted (a platform's 1000 adapters over 64 files)
            # is registered by its hash, with no copy of its bytes: 80 MiB each was 75 GB of writes.
            # New content is read twice then (the hash here, the copy below): a second read from the
            # page cache, against a copy, vLLM's validation load and the rules' scan of every tensor.
            with self.uploads.hold(principal, field="lora_path"):
                digest = await asyncio.to_thread(_digest_from_roots, real, roots, self.settings.max_upload_bytes)
                if (rec := await self._register_stored(principal, ns, name, digest, replace=replace)) is not None:
                    return rec
        size = await asyncio.to_thread(_dir_bytes, real)
        async with self.staging(principal, reserve=size, field="lora_path") as staged:
            await asyncio.to_thread(_copy_from_roots, real, roots, staged)
            return await self.add(principal, name, staged, tenant=tenant, replace=replace, refusal_field="lora_path")

    async def register_modules(self, modules: list[str], tenant: str) -> list[AdapterRecord]:
        """vLLM's ``--lora-modules``: register each ``name=path`` (or JSON ``{"name", "path"}``) for
        ``tenant`` at start, through the same checks as an upload. A name already registered with
        the same files is kept as it is; with other files it is replaced."""
        from server.tenants.store import Role

        self.tenants.get(tenant)  # TenantNotFound: say so at start
        operator = Principal("(--lora-modules)", Role.ADMIN)
        out = []
        for spec in modules:
            name, path = _module(spec)
            src = Path(path).resolve()
            if not src.is_dir():
                raise InvalidArgument(f"--lora-modules {spec!r}: {path} is not a directory", field="lora_modules")
            existing = self.registry.find(tenant, name)
            if existing is not None and await asyncio.to_thread(
                    _digest_from_roots, src, None, self.settings.max_upload_bytes) == existing.digest:
                out.append(existing)  # a restart: the same files, not copied again
                continue
            size = await asyncio.to_thread(_dir_bytes, src)
            async with self.staging(operator, reserve=size, field="lora_modules") as staged:
                await asyncio.to_thread(copy_dir, src, staged)
                rec = await self.add(operator, name, staged, tenant=tenant, replace=existing is not None,
                                     refusal_field="lora_modules")
            logger.info("--lora-modules: %s -> %s/%s version %d", path, tenant, name, rec.version)
            out.append(rec)
        return out

    # ------------------------------------------------------------ queries

    def list_adapters(self, principal: Principal, tenant: str | None = None) -> list[AdapterRecord]:
        return self.registry.list(self.namespace(principal, tenant))

    def get_adapter(self, principal: Principal, name: str, tenant: str | None = None) -> AdapterRecord:
        return self.registry.get(self.namespace(principal, tenant), name)

    def residency_of(self, rec: AdapterRecord) -> str:
        entry = self.residency.get(rec.key)
        return entry.state.value if entry else "registered"

    def tiers(self, registered: int) -> dict[str, int]:
        loaded = [e for e in self.residency.entries() if e.state.value == "loaded"]
        busy = sum(1 for e in loaded if e.refs > 0)
        return {"registered": registered, "cpu": len(loaded), "gpu": min(busy, self.settings.max_loras)}

    # ------------------------------------------------------------ delete, pin

    async def delete(self, principal: Principal, name: str, tenant: str | None = None) -> list[AdapterRecord]:
        removed = await asyncio.to_thread(self.registry.delete, self.namespace(principal, tenant), name)
        for rec in removed:
            self._retiring.pop(rec.key, None)
            await asyncio.to_thread(self.store.release, rec.digest)
            await self.residency.retire(rec.key)
        await self.changed()
        await self.gc()
        return removed

    async def set_pinned(self, principal: Principal, name: str, pinned: bool,
                         tenant: str | None = None) -> AdapterRecord:
        ns = self.namespace(principal, tenant)
        rec = self.registry.get(ns, name)
        share, r = self.settings.max_pinned_share, self.residency
        # A tenant's pins are bounded, and so are all pins together (admins' count, but an admin,
        # the operator, may pin past the share), so that every other tenant's cold adapter still
        # finds room in the host tier.
        bounds = {} if not pinned or principal.is_admin else {
            "max_pinned": self.settings.max_pins_per_tenant,
            "room": (int(share * r.max_entries), share * r.budget_bytes)}
        if pinned:  # pinning keeps it warm: load it first (if the pin may be taken), pin once it is in
            if bounds:
                await asyncio.to_thread(self.registry.check_pin, ns, name, **bounds)
            await self.warm(rec, wait=True)
        await asyncio.to_thread(self.registry.set_pinned, ns, name, pinned, **bounds)
        self.residency.set_pinned(rec.key, pinned)
        await self.changed()
        return self.registry.get(ns, name)

    async def warm(self, rec: AdapterRecord, *, wait: bool = False) -> None:
        """Load a registered adapter into the engine's host tier now. If that needs room, the
        least recently used idle adapter leaves; with every adapter busy it raises
        :class:`AdapterCacheFull` at once unless ``wait``."""
        path = self.store.path(rec.digest) if self.residency.get(rec.key) else await self.store.local(rec.digest)
        entry = await self.residency.acquire(rec.key, str(path), rec.size_bytes, digest=rec.digest, pinned=rec.pinned,
                                             wait=wait)
        self.residency.release(entry)

    # ------------------------------------------------------------ reclaiming

    async def _retire(self, old: AdapterRecord) -> None:
        """A replaced version: out of service now, its row and blob reclaimed once it drains."""
        if self.residency.get(old.key) is None:
            await self.residency.retire(old.key)  # drops a background load still queued for it
            await self._reclaim(old)
            return
        self._retiring[old.key] = old
        await self.residency.retire(old.key)

    def _drained(self, key: str) -> None:
        """Residency's hook: a version left the engine (idle eviction or drained retirement)."""
        if (old := self._retiring.pop(key, None)) is not None:
            task = asyncio.get_running_loop().create_task(self._reclaim(old))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def settled(self) -> None:
        """Until the reclaims in flight (row, then blob) are done."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reclaim(self, old: AdapterRecord) -> None:
        await asyncio.to_thread(self._forget, old)
        await self.gc()

    def engine_lost(self) -> None:
        """The engine died: nothing is loaded any more and every request on it failed, so the
        retired versions waiting for their requests to drain have drained."""
        self.residency.reset()
        for old in self._retiring.values():
            self._forget(old)
        self._retiring.clear()

    def _forget(self, old: AdapterRecord) -> None:
        self.registry.forget(old)
        self.store.release(old.digest)

    def _live(self) -> set[str]:
        """Blobs that must stay: a row refers to them, or a cache entry may still load them."""
        return self.registry.live_digests() | self.residency.digests()

    async def gc(self) -> list[str]:
        async with self._store_lock:
            try:
                removed = await asyncio.to_thread(self.store.gc, self._live(), grace_s=self.gc_grace_s)
            except Exception:
                logger.warning("adapter store gc failed", exc_info=True)
                return []
        for digest in removed:
            logger.info("reclaimed adapter blob %s", digest)
        return removed

    async def gc_forever(self) -> None:
        """Collect blobs as their grace periods end (deletes and drains collect at once too)."""
        period = max(1.0, min(60.0, self.gc_grace_s / 2 or 1.0))
        while True:
            await asyncio.sleep(period)
            await self.gc()


STALE_RETIRED_S = 600.0
"""A retired version is drained by the server that retired it. With a shared registry, one
retired longer ago than this (its server crashed before it forgot the row) is reclaimed by
whichever server starts next."""


def recover(registry: AdapterRegistry, store, *, grace_s: float = 0.0) -> dict[str, int]:
    """Repair what a crash left, before serving; logs one line per thing repaired, returns the counts.

    Alone on its registry and store (``grace_s`` 0) nothing is in flight yet, so retired rows and
    unreferenced blobs go at once. Sharing them (``grace_s`` > 0), other servers may be mid-upload
    or still draining: unreferenced blobs go only after their grace period, retired rows only
    once stale (:data:`STALE_RETIRED_S`)."""
    from server.errors import StoreUnavailable

    counts = {"staging": 0, "retired_rows": 0, "rows_without_blob": 0, "orphan_blobs": 0}
    for path in store.clean_staging():
        logger.warning("recovery: removed leftover staging directory %s (an upload cut short)", path.name)
        counts["staging"] += 1
    try:
        for rec in registry.records():
            if not store.exists(rec.digest) or (not store.shared and not store.intact(rec.digest)):
                logger.error("recovery: adapter %s has no intact blob %s; dropping its row (upload it again)",
                             rec.key, rec.digest)
                registry.drop(rec)
                counts["rows_without_blob"] += 1
    except StoreUnavailable as e:
        logger.warning("recovery: the adapter store does not answer (%s); blobs not checked", e.message)
    now = time.time()
    for rec in registry.retired():
        if grace_s and now - (rec.retired_at or rec.created_at) < max(grace_s, STALE_RETIRED_S):
            continue  # another server may still be draining it
        logger.info("recovery: dropping retired version %s (nothing in flight on it)", rec.key)
        registry.forget(rec)
        counts["retired_rows"] += 1
    try:
        live = registry.live_digests()
        if grace_s:
            removed = store.gc(live, grace_s=grace_s)
        else:
            removed = sorted(store.digests() - live)
            for digest in removed:
                store.delete(digest)
        for digest in removed:
            logger.warning("recovery: removed adapter blob %s that no adapter refers to", digest)
        counts["orphan_blobs"] += len(removed)
    except StoreUnavailable as e:
        logger.warning("recovery: the adapter store does not answer (%s); unreferenced blobs stay for now", e.message)
    return counts


def _dir_bytes(path: Path) -> int:
    """What copying ``path`` stages (its files, as the copy follows them)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _module(spec: str) -> tuple[str, str]:
    """``name=path`` or vLLM's JSON form ``{"name": ..., "path": ...}``."""
    import json

    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
            return str(obj["name"]), str(obj["path"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(f"--lora-modules {spec!r}: JSON needs name and path", field="lora_modules") from None
    name, eq, path = spec.partition("=")
    if not eq or not name or not path:
        raise InvalidArgument(f"--lora-modules {spec!r}: expected name=path", field="lora_modules")
    return name, path


def _copy_from_roots(src: Path, roots: list[Path] | None, staged: StagedUpload) -> None:
    """A server directory's adapter files. A symlink may point anywhere under the
    --lora-roots (say, at a shared weights file) but not outside them (``roots=None``: the
    operator's own --lora-modules, anywhere)."""
    for f in sorted(src.iterdir()):
        if roots is not None and f.is_file() and not any(f.resolve().is_relative_to(r) for r in roots):
            raise PermissionDenied(f"{f.name} in lora_path links outside the configured --lora-roots",
                                   field="lora_path")
    copy_dir(src, staged)


def _digest_from_roots(src: Path, roots: list[Path] | None, max_bytes: int) -> str:
    """The digest :meth:`StagedUpload.finish` would give a copy of ``src``, under the same rules,
    with nothing written."""
    probe = StagedUpload(None, max_bytes=max_bytes)
    _copy_from_roots(src, roots, probe)
    return probe.finish()

