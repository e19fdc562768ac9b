"""The service layer: everything HTTP and gRPC do, in one place.

One request: the front hands over the Authorization header and a parsed
request -> ``authenticate`` resolves the key to a tenant and applies its rate
limit -> ``resolve`` maps ``model="<base>:<adapter>"`` inside that tenant's
namespace (from an in-memory snapshot of the registry, not SQLite) -> the
residency manager makes sure that adapter version is in the engine (loading it
with ``add_lora`` first if it is not) -> vLLM generates -> deltas stream back,
and metrics record latency and tokens.

Adapter management (upload, replace, delete, pin, reclaiming) is
:class:`~server.adapters.service.AdapterService`, at ``Service.adapters``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.adapters.registry import AdapterRecord, AdapterRegistry, not_found
from server.adapters.residency import ResidencyManager
from server.adapters.service import AdapterService
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.engine.types import Completion, Sampling
from server.errors import EngineNotReady, InvalidArgument, PermissionDenied, TenantNotFound
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
        self.adapters = AdapterService(settings, base_spec=base_spec, engine=engine, tenants=tenants,
                                       registry=registry, store=store, residency=self.residency,
                                       namespace=self.namespace)
        self.started = int(time.time())
        self._snapshot: dict[tuple[str, str], AdapterRecord] = {}
        self._snapshot_gen = -1
        self._aborts: set[asyncio.Task] = set()  # engine aborts in flight, referenced until done

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
        try:
            self.tenants.get(tenant)
        except TenantNotFound as e:
            raise TenantNotFound(e.message, field="tenant") from None
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
                                                     digest=rec.digest, pinned=rec.pinned)
                lora = (entry.lora_name, entry.lora_id, entry.path)
            m.queue.observe(time.perf_counter() - t0)
            async for delta in self.engine.generate(gen.prompt_ids, gen.sampling, request_id, lora=lora):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                    m.ttft.observe(first - t0)
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
            # Nothing here awaits: a stream whose client left is torn down inside a cancelled
            # (anyio) scope, where every await raises again, and the adapter would never be
            # released. The abort goes to a task of its own.
            if entry is not None:
                self.residency.release(entry)
            if not finished:
                self._abort_soon(request_id)
            end = time.perf_counter()
            m.requests(endpoint, status).inc()
            m.e2e.observe(end - t0)
            m.tokens_in.inc(len(gen.prompt_ids))
            m.tokens_out.inc(n_out)
            if first is not None and n_out > 1:
                m.tpot.observe((end - first) / (n_out - 1))

    def _abort_soon(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:
            logger.debug("abort of %s failed", request_id, exc_info=True)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """The base tokenizer's chat template -- the same rendering the trainer trained on."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def adapter_tiers(self) -> dict[str, int]:
        return self.adapters.tiers(len(self._adapters()))
