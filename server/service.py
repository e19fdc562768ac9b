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
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.adapters.registry import AdapterRecord, AdapterRegistry, not_found
from server.adapters.residency import Entry, ResidencyManager
from server.adapters.service import AdapterService
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.engine.types import Completion, Sampling
from server.errors import (EngineNotReady, InvalidArgument, LoraplexError, PermissionDenied, ShuttingDown,
                           TenantNotFound)
from server.metrics import Metrics
from server.tenants.auth import Authenticator
from server.tenants.ratelimit import InFlightLimiter, Lease, RateLimiter
from server.tenants.store import Principal, TenantStore

logger = logging.getLogger(__name__)

_INLINE_PROMPT_CHARS = 4096
"""Prompts up to this size are tokenized on the event loop (tens of microseconds)."""


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


class Admission:
    """What an admitted request holds until it ends: its share of the tenant's in-flight limits and
    a reference to its adapter in the engine. :meth:`release` is idempotent, so whichever of the
    stream's ``finally`` and the front's cleanup comes first gives them back."""

    __slots__ = ("_service", "request_id", "lease", "entry", "t0", "interrupted", "_released")

    def __init__(self, service: Service, request_id: str, lease: Lease, t0: float):
        self._service, self.request_id, self.lease, self.t0 = service, request_id, lease, t0
        self.entry: Entry | None = None
        self.interrupted = False
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.lease.release()
        if self.entry is not None:
            self._service.residency.release(self.entry)
        self._service.active.discard(self)


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
        self.inflight = InFlightLimiter()
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
        self.active: set[Admission] = set()  # admitted requests not yet finished
        self.draining = False
        self.max_prompt_chars = settings.max_prompt_chars or 64 * settings.max_model_len

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

    def list_models(self, principal: Principal) -> list[ModelCard]:
        cards = [ModelCard(self.served_name, self.started, "loraplex", str(self.base.path), None)]
        for (tenant, name), rec in sorted(self._adapters().items()):
            if tenant == principal.tenant:
                cards.append(ModelCard(f"{self.served_name}:{name}", int(rec.created_at), tenant,
                                       f"sha256:{rec.digest}", self.served_name))
        return cards

    # ------------------------------------------------------------ generation

    def prepare(self, principal: Principal, model: str, prompt_ids: list[int], sampling: Sampling,
                *, prompt_field: str, client_ids: bool = False) -> Generation:
        """Resolve the model and check the prompt against the vocabulary (``client_ids``: the
        client sent token ids) and the context, before any engine work."""
        self._check_serving()
        adapter = self.resolve(principal, model)
        limit = self.settings.max_model_len
        if not prompt_ids:
            raise InvalidArgument("the prompt is empty", field=prompt_field)
        if client_ids:
            self._check_token_ids(prompt_ids, prompt_field)
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

    def _check_serving(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if not self.engine.ready:
            raise EngineNotReady("the engine is not ready yet")

    async def admit(self, principal: Principal, gen: Generation, *, protocol: str, endpoint: str,
                    request_id: str | None = None) -> Admission:
        """Take the request's share of its tenant's in-flight limits and a reference to its adapter
        in the engine (loading it if it is cold). Fronts await this before they answer, so a
        request that cannot run gets a real 429/503, even a streaming one."""
        t0 = time.perf_counter()
        request_id = request_id or f"{protocol}-{uuid.uuid4().hex}"
        try:
            self._check_serving()
            lease = self.inflight.admit(principal, gen.sampling.max_tokens * gen.sampling.n)
        except LoraplexError:
            self.metrics.series(protocol, principal.tenant, gen.adapter.name if gen.adapter else None) \
                .requests(endpoint, "rejected").inc()
            raise
        admission = Admission(self, request_id, lease, t0)
        try:
            if (rec := gen.adapter) is not None:
                admission.entry = await self.residency.acquire(rec.key, str(self.store.path(rec.digest)),
                                                               rec.size_bytes, digest=rec.digest, pinned=rec.pinned)
        except BaseException:
            admission.release()
            self.metrics.series(protocol, principal.tenant, rec.name).requests(endpoint, "rejected").inc()
            raise
        self.active.add(admission)
        return admission

    async def generate(self, principal: Principal, gen: Generation, admission: Admission, *, protocol: str,
                       endpoint: str) -> AsyncIterator[Completion]:
        """Stream deltas of an admitted request; its admission is released when this ends.
        Closing the stream early aborts the vLLM request."""
        m = self.metrics.series(protocol, principal.tenant, gen.adapter.name if gen.adapter else None)
        t0, entry, request_id = admission.t0, admission.entry, admission.request_id
        status = "error"
        finished = False
        n_out = 0
        first = None
        try:
            lora = (entry.lora_name, entry.lora_id, entry.path) if entry is not None else None
            m.queue.observe(time.perf_counter() - t0)
            async for delta in self.engine.generate(gen.prompt_ids, gen.sampling, request_id, lora=lora):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                    m.ttft.observe(first - t0)
                n_out += len(delta.token_ids)
                yield delta
            if admission.interrupted:  # aborted at the end of a drain: say so, not "finished"
                raise ShuttingDown(f"the server shut down before this request finished (--shutdown-grace-s "
                                   f"{self.settings.shutdown_grace_s:g})")
            finished = True
            status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            # Nothing here awaits: a stream whose client left is torn down inside a cancelled
            # (anyio) scope, where every await raises again, and the adapter would never be
            # released. The abort goes to a task of its own.
            admission.release()
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

    # ------------------------------------------------------------ draining

    def start_draining(self) -> None:
        """SIGTERM: from now on /ready and gRPC health say no, and new requests get 503."""
        if not self.draining:
            logger.warning("draining: %d requests in flight; new requests get 503", len(self.active))
        self.draining = True

    async def drain(self, grace_s: float) -> int:
        """Wait up to ``grace_s`` for the requests in flight to finish; abort the rest, whose
        streams end with a final ``server_shutting_down`` error. Returns how many were cut."""
        self.start_draining()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.active and loop.time() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
        cut = list(self.active)
        for admission in cut:
            admission.interrupted = True
            self._abort_soon(admission.request_id)
        if cut:
            logger.warning("drain: %d requests still running after %.0f s; ending them", len(cut), grace_s)
            while self.active and loop.time() < deadline + 5:  # their streams end with the error event
                await asyncio.sleep(0.05)
        return len(cut)

    # ------------------------------------------------------------ prompts

    async def render_chat(self, messages: list[dict], *, field: str = "messages") -> list[int]:
        """The base tokenizer's chat template -- the same rendering the trainer trained on.
        A template that refuses the conversation (roles out of order, say) is the client's 400."""
        self._check_prompt_bytes(sum(len(str(m.get("content") or "")) for m in messages), field)
        return await self._off_loop(self._render, messages, field, size=sum(len(str(m)) for m in messages))

    def _render(self, messages: list[dict], field: str) -> list[int]:
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            raise InvalidArgument(f"the chat template refused these messages: {e}", field=field) from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    async def encode(self, prompt: str, *, field: str = "prompt") -> list[int]:
        self._check_prompt_bytes(len(prompt), field)
        return await self._off_loop(self._encode, prompt, size=len(prompt))

    def _encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _check_token_ids(self, ids: list[int], field: str) -> None:
        """Token ids a client sent: each must be in the vocabulary (vLLM would fail on it)."""
        vocab = self.vocab_size
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise InvalidArgument(f"token id {t!r} at position {i} is outside this model's vocabulary "
                                      f"(0..{vocab - 1})", field=field)

    def _check_prompt_bytes(self, n: int, field: str) -> None:
        if n > self.max_prompt_chars:
            raise InvalidArgument(f"the prompt is {n} characters; this server takes at most {self.max_prompt_chars} "
                                  f"(--max-prompt-chars; the context is {self.settings.max_model_len} tokens)",
                                  field=field)

    async def _off_loop(self, fn, *args, size: int):
        """Small prompts inline (a thread hop costs more than tokenizing them); large ones in a
        worker thread, so that one tenant's long prompt never stalls everyone's streams."""
        if size <= _INLINE_PROMPT_CHARS:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def adapter_tiers(self) -> dict[str, int]:
        return self.adapters.tiers(len(self._adapters()))
