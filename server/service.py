"""The service layer: everything HTTP and gRPC do, in one place.

One request: the front hands over the Authorization header and a parsed
request -> ``authenticate`` resolves the key to a tenant and applies its rate
limit -> ``resolve`` maps ``model="<base>:<adapter>"`` inside that tenant's
namespace (from an in-memory snapshot of the registry, not SQLite) -> the
residency manager makes sure that adapter version is in the engine -> vLLM
generates -> deltas stream back, and metrics record latency and tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from server.adapters.registry import AdapterRecord, AdapterRegistry, not_found, validate_name
from server.adapters.residency import AdapterCacheFull, ResidencyManager
from server.adapters.store import AdapterStore, digest_dir, digest_files
from server.adapters.upload import AdapterInfo, BaseSpec, UploadFile, accepted_files, unpack, validate
from server.config import Settings
from server.engine.types import Completion, Sampling
from server.errors import AdapterRejected, Conflict, EngineNotReady, InvalidArgument, PermissionDenied, QuotaExceeded
from server.metrics import Metrics
from server.tenants.auth import Authenticator
from server.tenants.ratelimit import RateLimiter
from server.tenants.store import Principal, TenantStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    id: str
    created: int
    owned_by: str
    root: str
    parent: str | None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Generation:
    """What a front needs to run and report one generation."""

    model: str
    adapter: AdapterRecord | None
    prompt_ids: list[int]
    sampling: Sampling


class Service:
    def __init__(self, settings: Settings, *, base, base_spec: BaseSpec, engine, tokenizer, tenants: TenantStore,
                 registry: AdapterRegistry, store: AdapterStore, metrics: Metrics):
        self.settings = settings
        self.base = base
        self.base_spec = base_spec
        self.served_name = settings.served_name or base_spec.name
        self.engine = engine
        self.tokenizer = tokenizer
        self.tenants = tenants
        self.auth = Authenticator(tenants)
        self.limiter = RateLimiter()
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.residency = ResidencyManager(engine, budget_bytes=settings.adapter_cache_bytes,
                                          max_entries=settings.max_cpu_loras, events=metrics,
                                          admission_timeout_s=settings.adapter_queue_timeout_s)
        self.started = int(time.time())
        self._snapshot: dict[tuple[str, str], AdapterRecord] = {}
        self._snapshot_gen = -1
        self._store_lock = asyncio.Lock()

    # ------------------------------------------------------------ auth

    def authenticate(self, authorization: str | None) -> Principal:
        principal = self.auth.authenticate(authorization)
        self.limiter.check(principal)
        return principal

    def namespace(self, principal: Principal, tenant: str | None) -> str:
        """The tenant whose adapters a call acts on: the caller's own, or any for an admin."""
        if tenant is None or tenant == principal.tenant:
            return principal.tenant
        if not principal.is_admin:
            raise PermissionDenied("only an admin key may act on another tenant's adapters", field="tenant")
        self.tenants.get(tenant)  # NotFound for an unknown tenant
        return tenant

    # ------------------------------------------------------------ models

    def _adapters(self) -> dict[tuple[str, str], AdapterRecord]:
        if self.registry.generation != self._snapshot_gen:
            self._snapshot_gen = self.registry.generation
            self._snapshot = self.registry.snapshot()
        return self._snapshot

    def resolve(self, principal: Principal, model: str) -> AdapterRecord | None:
        """``<base>`` -> None; ``<base>:<adapter>`` (or a bare adapter name) -> the caller's adapter."""
        if model == self.served_name:
            return None
        name = model.removeprefix(self.served_name + ":")
        record = self._adapters().get((principal.tenant, name))
        if record is None:  # same answer for "missing" and "someone else's"
            raise not_found(model)
        return record

    def list_models(self, principal: Principal) -> list[ModelCard]:
        cards = [ModelCard(self.served_name, self.started, "loraplex", str(self.base.path), None)]
        for (tenant, name), rec in sorted(self._adapters().items()):
            if tenant == principal.tenant:
                cards.append(ModelCard(f"{self.served_name}:{name}", int(rec.created_at), tenant,
                                       f"sha256:{rec.digest}", self.served_name))
        return cards

    # ------------------------------------------------------------ generation

    def prepare(self, principal: Principal, model: str, prompt_ids: list[int], sampling: Sampling,
                *, prompt_field: str) -> Generation:
        """Resolve the model and check lengths against the context, before any engine work."""
        if not self.engine.ready:
            raise EngineNotReady("the engine is not ready yet")
        adapter = self.resolve(principal, model)
        limit = self.settings.max_model_len
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty", field=prompt_field)
        if len(prompt_ids) >= limit:
            raise InvalidArgument(f"the prompt is {len(prompt_ids)} tokens; this model's context is {limit} tokens "
                                  "(prompt + completion)", field=prompt_field)
        if sampling.n > 1 and sampling.temperature == 0:
            raise InvalidArgument("n > 1 needs temperature > 0: greedy decoding gives n identical choices", field="n")
        room = limit - len(prompt_ids)
        if sampling.max_tokens is None or sampling.max_tokens <= 0:
            sampling = Sampling(**{**sampling.__dict__, "max_tokens": room})
        elif sampling.max_tokens > room:
            raise InvalidArgument(f"max_tokens is {sampling.max_tokens}, but the prompt leaves room for {room} "
                                  f"of this model's {limit}-token context", field="max_tokens")
        return Generation(model, adapter, prompt_ids, sampling)

    async def generate(self, principal: Principal, gen: Generation, *, protocol: str,
                       endpoint: str) -> AsyncIterator[Completion]:
        """Stream deltas. Cancelling the consumer aborts the vLLM request."""
        m = self.metrics.series(protocol, principal.tenant, gen.adapter.name if gen.adapter else None)
        t0 = time.perf_counter()
        status = "error"
        entry = None
        request_id = f"{protocol}-{uuid.uuid4().hex}"
        finished = False
        n_out = 0
        first = None
        try:
            lora = None
            if gen.adapter is not None:
                rec = gen.adapter
                entry = await self.residency.acquire(rec.key, str(self.store.path(rec.digest)), rec.size_bytes,
                                                     pinned=rec.pinned)
                lora = (entry.lora_name, entry.lora_id, entry.path)
            m.queue.observe(time.perf_counter() - t0)
            async for delta in self.engine.generate(gen.prompt_ids, gen.sampling, request_id, lora=lora):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                    m.ttft.observe(first - t0)
                    if entry is not None:
                        self.residency.first_token(entry)
                n_out += len(delta.token_ids)
                yield delta
            finished = True
            status = "ok"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except GeneratorExit:
            status = "cancelled"
            raise
        finally:
            if not finished:
                await self._abort(request_id)
            if entry is not None:
                self.residency.release(entry)
            end = time.perf_counter()
            m.requests(endpoint, status).inc()
            m.e2e.observe(end - t0)
            m.tokens_in.inc(len(gen.prompt_ids))
            m.tokens_out.inc(n_out)
            if first is not None and n_out > 1:
                m.tpot.observe((end - first) / (n_out - 1))

    async def _abort(self, request_id: str) -> None:
        try:
            await asyncio.shield(self.engine.abort(request_id))
        except Exception:
            logger.debug("abort of %s failed", request_id, exc_info=True)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """The base tokenizer's chat template -- the same rendering the trainer trained on."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------ adapters

    async def upload(self, principal: Principal, name: str, *, files: list[UploadFile] | None = None,
                     tarball: bytes | None = None, tenant: str | None = None, replace: bool = False) -> AdapterRecord:
        """Validate, store and register an adapter; on any failure nothing is kept."""
        ns = self.namespace(principal, tenant)
        validate_name(name)
        quotas = self.tenants.get(ns).quotas if ns != principal.tenant else principal.quotas
        # Refuse what the registry would refuse before any bytes are written.
        if replace:
            self.registry.get(ns, name)
        else:
            self._check_new(ns, name, quotas)
        max_rank = min(self.settings.max_lora_rank, quotas.max_rank)
        with self.store.staging_dir() as staging:
            # File work (write, parse the header, hash) runs in a worker thread:
            # an upload of hundreds of MB must not stall the streams being served.
            known = await asyncio.to_thread(self._known_blob, files, max_rank) if files is not None else None
            if known is None:
                info, digest = await asyncio.to_thread(self._stage, files, tarball, staging, max_rank)
            else:
                info, digest = known
            # put + register under one lock: a blob is never live-but-unregistered
            # when a failed registration deletes it.
            async with self._store_lock:
                existed = self.store.exists(digest)
                if known is not None and not self.store.reuse(digest):  # gc took it meanwhile: store it
                    info, digest = await asyncio.to_thread(self._stage, files, tarball, staging, max_rank)
                    known = None
                if known is None:
                    digest, _ = self.store.put(staging, digest=digest)
                try:
                    if replace:
                        new, old = self.registry.replace(ns, name, digest, info)
                    else:
                        return self.registry.add(ns, name, digest, info, max_adapters=quotas.max_adapters)
                except BaseException:
                    if not existed and digest not in self.registry.live_digests():
                        self.store.delete(digest)
                    raise
        await self.residency.retire(old.key)
        return new

    def _known_blob(self, files: list[UploadFile], max_rank: int) -> tuple[AdapterInfo, str] | None:
        """The same bytes are in the store already (many tenants, one fine-tune): check them
        for this tenant in place and skip writing and syncing another copy."""
        digest = digest_files(accepted_files(files))
        if not self.store.exists(digest):
            return None
        return validate(self.store.path(digest), self.base_spec, max_rank=max_rank), digest

    def _stage(self, files: list[UploadFile] | None, tarball: bytes | None, staging: Path,
               max_rank: int) -> tuple[AdapterInfo, str]:
        unpack(files, tarball, staging)
        return validate(staging, self.base_spec, max_rank=max_rank), digest_dir(staging)

    def _check_new(self, tenant: str, name: str, quotas) -> None:
        active = self.registry.list(tenant)
        if any(r.name == name for r in active):
            raise Conflict(f"adapter {name!r} already exists; PUT /v1/adapters/{name} replaces it", field="name")
        if len(active) >= quotas.max_adapters:
            raise QuotaExceeded(f"tenant {tenant!r} has {len(active)} adapters, its quota is {quotas.max_adapters}",
                                field="name")

    def list_adapters(self, principal: Principal, tenant: str | None = None) -> list[AdapterRecord]:
        return self.registry.list(self.namespace(principal, tenant))

    def get_adapter(self, principal: Principal, name: str, tenant: str | None = None) -> AdapterRecord:
        return self.registry.get(self.namespace(principal, tenant), name)

    async def delete_adapter(self, principal: Principal, name: str, tenant: str | None = None) -> list[AdapterRecord]:
        removed = self.registry.delete(self.namespace(principal, tenant), name)
        for rec in removed:
            await self.residency.retire(rec.key)
        self._gc()
        return removed

    async def set_pinned(self, principal: Principal, name: str, pinned: bool, tenant: str | None = None) -> AdapterRecord:
        ns = self.namespace(principal, tenant)
        self.registry.set_pinned(ns, name, pinned)
        rec = self.registry.get(ns, name)
        if pinned:  # pinning keeps it warm: load now
            await self.warm(rec, wait=True)
        self.residency.set_pinned(rec.key, pinned)
        return rec

    def residency_of(self, rec: AdapterRecord) -> str:
        entry = self.residency.get(rec.key)
        return entry.state.value if entry else "registered"

    def adapter_tiers(self) -> dict[str, int]:
        loaded = [e for e in self.residency.entries() if e.state.value == "loaded"]
        busy = sum(1 for e in loaded if e.refs > 0)
        return {"registered": len(self._adapters()), "cpu": len(loaded),
                "gpu": min(busy, self.settings.max_loras)}

    async def load_from_path(self, principal: Principal, name: str, path: str, tenant: str | None = None) -> AdapterRecord:
        """vLLM's /v1/load_lora_adapter: admins only, and only from --lora-roots."""
        if not principal.is_admin:
            raise PermissionDenied("loading adapters from server paths needs an admin key", field="lora_path")
        real = Path(path).resolve()
        roots = [r.resolve() for r in self.settings.lora_roots]
        if not any(real.is_relative_to(r) for r in roots):
            raise PermissionDenied(f"lora_path must be under one of the configured --lora-roots "
                                   f"({', '.join(map(str, roots)) or 'none configured'})", field="lora_path")
        if not real.is_dir():
            raise InvalidArgument(f"lora_path {path!r} is not a directory", field="lora_path")
        files = await asyncio.to_thread(_read_dir, real, roots)
        rec = await self.upload(principal, name, files=files, tenant=tenant)
        try:
            await self.warm(rec)
        except AdapterCacheFull:
            logger.info("adapter %s registered; not preloaded: the adapter cache is full of busy adapters", rec.key)
        except Exception as e:  # whatever vLLM raised: it refused this adapter
            await self._unregister(rec)  # nothing half-registered
            raise AdapterRejected(f"vLLM could not load the adapter at {path}: {e}", field="lora_path") from None
        return rec

    async def _unregister(self, rec: AdapterRecord) -> None:
        """Undo a registration that just happened: the record, its engine entry, and its blob
        unless another adapter shares it (not left to gc's grace period)."""
        async with self._store_lock:
            self.registry.delete(rec.tenant, rec.name)
            if rec.digest not in self.registry.live_digests():
                self.store.delete(rec.digest)
        await self.residency.retire(rec.key)

    async def warm(self, rec: AdapterRecord, *, wait: bool = False) -> None:
        """Load a registered adapter into the engine's host tier now, as vLLM's own
        ``/v1/load_lora_adapter`` and ``--lora-modules`` do: the engine validates it, and
        its first request finds it in memory. If that needs room, the least recently used
        idle adapter leaves (its pinned host memory is reused for this one); with every
        adapter busy it raises :class:`AdapterCacheFull` at once unless ``wait``."""
        entry = await self.residency.acquire(rec.key, str(self.store.path(rec.digest)), rec.size_bytes,
                                             pinned=rec.pinned, wait=wait)
        try:
            await self.residency.preload(entry)
        finally:
            self.residency.release(entry)

    def _gc(self) -> None:
        try:
            self.store.gc(self.registry.live_digests())
        except Exception:
            logger.warning("adapter store gc failed", exc_info=True)


def _read_dir(path: Path, roots: list[Path]) -> list[UploadFile]:
    """The adapter files of a server directory. A symlink may point anywhere under the
    --lora-roots (say, at a shared weights file) but not outside them."""
    files = []
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        if not any(f.resolve().is_relative_to(r) for r in roots):
            raise PermissionDenied(f"{f.name} in lora_path links outside the configured --lora-roots",
                                   field="lora_path")
        files.append(UploadFile(f.name, f.read_bytes()))
    return files
