"""The service layer: everything HTTP and gRPC do, in one place.

One request: the front hands over the Authorization header and a parsed
request -> ``authenticate`` resolves the key to a tenant and applies its rate
limit -> ``resolve`` maps ``model="<base>:<adapter>"`` inside that tenant's
namespace (from an in-memory snapshot of the registry, not SQLite) ->
``inference`` prepares, admits (the adapter in the engine, loaded with
``add_lora`` first if it is not) and streams the generation -> deltas stream
back, and metrics record latency and tokens.

Prompts (chat templates, tokenizing) are :class:`~server.inference.prompts.Prompts`
at ``Service.prompts``; generation is
:class:`~server.inference.generation.InferenceService` at ``Service.inference``;
adapter management (upload, replace, delete, pin, reclaiming) is
:class:`~server.adapters.service.AdapterService` at ``Service.adapters``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from server.adapters.registry import AdapterRecord, AdapterRegistry, not_found
from server.adapters.residency import ResidencyManager
from server.adapters.service import AdapterService
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.errors import ShuttingDown, Unauthenticated
from server.inference.generation import InferenceService
from server.inference.prompts import Prompts
from server.metrics import Metrics
from server.tenants.auth import Authenticator
from server.tenants.ratelimit import RateLimiter, SharedRateLimiter
from server.tenants.store import Principal, TenantStore

logger = logging.getLogger(__name__)

UNKNOWN_KEY_POLL_S = 0.1
"""An unknown key reads the registry's generation at most this often (all such callers share the read)."""


@dataclass(frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str
    root: str
    parent: str | None


class Service:
    def __init__(self, settings: Settings, *, base, base_spec: BaseSpec, engine, tokenizer, tenants: TenantStore,
                 registry: AdapterRegistry, store: AdapterStore, metrics: Metrics, tool_parser=None):
        self.settings = settings
        self.base = base
        self.base_spec = base_spec
        self.served_name = settings.served_name or base_spec.name
        self.engine = engine
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser
        """vLLM's --tool-call-parser, with --enable-auto-tool-choice (server/engine/tool_parsers.py)."""
        self.tenants = tenants
        self.auth = Authenticator(tenants)
        self.limiter = SharedRateLimiter(settings.rate_limit_url) if settings.rate_limit_url else RateLimiter()
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.residency = ResidencyManager(engine, budget_bytes=settings.adapter_cache_bytes,
                                          max_entries=settings.max_cpu_loras, events=metrics,
                                          admission_timeout_s=settings.adapter_queue_timeout_s)
        if hasattr(store, "in_use"):  # a remote store's local cache never evicts what vLLM may read
            store.in_use = self.residency.digests
        self.adapters = AdapterService(settings, base_spec=base_spec, engine=engine, tenants=tenants,
                                       registry=registry, store=store, residency=self.residency,
                                       namespace=self.namespace)
        self.started = int(time.time())
        self._snapshot: dict[tuple[str, str], AdapterRecord] = {}
        self._snapshot_gen = -1
        self._reloading = asyncio.Lock()
        self._polling: asyncio.Future | None = None
        self._polled_at = 0.0
        self.forward_secret: str | None = None
        """Set on a Ray Serve engine replica only: its loopback gRPC calls carry it (server/cluster)."""
        self._tasks: set[asyncio.Task] = set()
        self.prompts = Prompts(tokenizer, max_chars=settings.max_prompt_chars or 64 * settings.max_model_len,
                               max_model_len=settings.max_model_len,
                               model_dir=getattr(base, "path", None))
        self.adapters.on_change = self.refresh
        self.inference = InferenceService(settings, engine=engine, prompts=self.prompts, residency=self.residency,
                                          store=store, metrics=metrics, resolve=self.resolve,
                                          is_current=self.is_current)

    # ------------------------------------------------------------ auth

    async def authenticate(self, authorization: str | None, *, charge: bool = True) -> Principal:
        """The caller behind an Authorization header, its request rate charged (in this process,
        or in Redis for every server with --rate-limit-url). While the server drains, every new
        request is refused first."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.registry.generation != self._snapshot_gen or self.auth.stale:
            await self._reload()  # a write the watcher has polled but not loaded yet: load it off the loop
        try:
            principal = self.auth.authenticate(authorization)
        except Unauthenticated:
            # A key made a moment ago (`tenants create`) works at once, not at the next poll.
            if not await self._poll_now():
                raise
            principal = self.auth.authenticate(authorization)
        if charge:  # False: a Ray Serve ingress charged this request already (server/cluster)
            await self.limiter.check(principal)
        return principal

    async def _poll_now(self) -> bool:
        """Read the registry's generation now, and load what moved; True if anything did. For
        unknown keys, so at most one read per UNKNOWN_KEY_POLL_S, shared by every caller: a flood
        of bad keys costs the registry nothing more."""
        if (self._polling is None or self._polling.get_loop() is not asyncio.get_running_loop()
                or (self._polling.done() and time.monotonic() - self._polled_at >= UNKNOWN_KEY_POLL_S)):
            self._polled_at = time.monotonic()
            self._polling = asyncio.ensure_future(asyncio.to_thread(self.registry.poll))
        with contextlib.suppress(Exception):  # the registry is down: the key stays unknown
            await asyncio.shield(self._polling)
        if self.registry.generation == self._snapshot_gen and not self.auth.stale:
            return False
        await self._reload()
        return True

    def namespace(self, principal: Principal, tenant: str | None) -> str:
        """The tenant whose adapters a call acts on: the caller's own, or any for an admin."""
        return self.tenants.acting_for(principal, tenant)

    # ------------------------------------------------------------ models

    def _adapters(self) -> dict[tuple[str, str], AdapterRecord]:
        """Every active adapter, from memory. Requests never query the registry: the watcher
        (:meth:`refresh`), each local write (``AdapterService.changed``) and :meth:`authenticate`
        load newer snapshots off the event loop. Only code outside a request (a CLI, a test)
        that reads before any load gets a blocking one."""
        generation = self.registry.generation  # before the load: a write after it reloads again
        if self._snapshot_gen < 0:
            for key in self._install(self.registry.snapshot(), generation):
                self._retire_soon(key)
        return self._snapshot

    async def refresh(self) -> bool:
        """Poll the registry's shared generation (off the event loop) and reload what changed;
        ``server.runtime.watch_registry`` calls it a few times a second. True if it reloaded."""
        generation = await asyncio.to_thread(self.registry.poll)
        if generation == self._snapshot_gen and not self.auth.stale:
            return False
        await self._reload()
        return True

    async def _reload(self) -> None:
        """Load the adapters and the principals of the generation last seen, in a thread, one
        load at a time (requests that find the snapshot stale wait for the same load)."""
        async with self._reloading:
            generation = self.registry.generation
            if generation != self._snapshot_gen:
                snapshot = await asyncio.to_thread(self.registry.snapshot)
                for key in self._install(snapshot, generation):
                    await self.residency.retire(key)
            if self.auth.stale:
                await asyncio.to_thread(self.auth.reload)

    def _install(self, snapshot: dict[tuple[str, str], AdapterRecord], generation: int) -> list[str]:
        """Take a newer snapshot; returns the versions that left it (replaced or deleted, here or
        through another server) and are in this server's engine: they drain out of it, as on a
        local replace."""
        if generation <= self._snapshot_gen:
            return []
        old, self._snapshot, self._snapshot_gen = self._snapshot, snapshot, generation
        gone = []
        for key, rec in old.items():
            current = snapshot.get(key)
            if (current is None or current.version != rec.version) and self.residency.knows(rec.key):
                gone.append(rec.key)
        return gone

    def _retire_soon(self, key: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool): nothing is serving
            return
        task = loop.create_task(self.residency.retire(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resolve(self, principal: Principal, model: str) -> AdapterRecord | None:
        """``<base>`` -> None; ``<base>:<adapter>`` (or a bare adapter name) -> the caller's adapter."""
        if model == self.served_name:
            return None
        name = model.removeprefix(self.served_name + ":")
        record = self._adapters().get((principal.tenant, name))
        if record is None:  # same answer for "missing" and "someone else's"
            raise not_found(model)
        return record

    def is_current(self, rec: AdapterRecord) -> bool:
        current = self._adapters().get((rec.tenant, rec.name))
        return current is not None and current.version == rec.version

    def list_models(self, principal: Principal) -> list[ModelCard]:
        cards = [ModelCard(self.served_name, self.started, "loraplex", str(self.base.path), None)]
        for (tenant, name), rec in sorted(self._adapters().items()):
            if tenant == principal.tenant:
                cards.append(ModelCard(f"{self.served_name}:{name}", int(rec.created_at), tenant,
                                       f"sha256:{rec.digest}", self.served_name))
        return cards

    @property
    def engine_version(self) -> str | None:
        return getattr(self.engine, "version", None)

    @property
    def draining(self) -> bool:
        return self.inference.draining

    def adapter_tiers(self) -> dict[str, int]:
        return self.adapters.tiers(len(self._adapters()))
