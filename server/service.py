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

import logging
import time
from dataclasses import dataclass

from server.adapters.registry import AdapterRecord, AdapterRegistry, not_found
from server.adapters.residency import ResidencyManager
from server.adapters.service import AdapterService
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.errors import PermissionDenied, ShuttingDown, TenantNotFound
from server.inference.generation import InferenceService
from server.inference.prompts import Prompts
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
        self.prompts = Prompts(tokenizer, max_chars=settings.max_prompt_chars or 64 * settings.max_model_len,
                               max_model_len=settings.max_model_len,
                               model_dir=getattr(base, "path", None))
        self.inference = InferenceService(settings, engine=engine, prompts=self.prompts, residency=self.residency,
                                          store=store, metrics=metrics, resolve=self.resolve,
                                          is_current=self.is_current)

    # ------------------------------------------------------------ auth

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an Authorization header, its request rate charged. While the
        server drains, every new request is refused first."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
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
