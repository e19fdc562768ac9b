"""One generation, end to end: prepare -> admit -> stream, and the drain at shutdown.

- :meth:`InferenceService.prepare` resolves the model in the caller's namespace, checks the
  prompts against the vocabulary and the context, fills unset sampling fields from the base's
  generation config (as ``vllm serve`` does) and builds the engine's sampling parameters once --
  every client mistake is a 400 here, before anything is held.
- :meth:`InferenceService.admit` takes the request's share of its tenant's in-flight limits and
  a reference to its adapter in the engine (loading it if cold). Fronts await it before they
  answer, so a request that cannot run gets a real 429/503, even a streaming one.
- :meth:`InferenceService.generate` streams deltas; closing it early aborts the vLLM request(s).
  A completions request with several prompts runs them as separate engine requests and
  numbers their choices ``prompt * n + choice``, as vLLM does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.adapters.registry import AdapterRecord
from server.adapters.residency import Entry
from server.engine.types import Completion, Sampling
from server.errors import Conflict, EngineNotReady, InvalidArgument, LoraplexError, ShuttingDown
from server.tenants.ratelimit import InFlightLimiter, Lease
from server.tenants.store import Principal

logger = logging.getLogger(__name__)

SHARED_SALT = "\x00shared"
"""The prefix-cache owner of --shared-prefix-cache-tenants (no tenant name has a NUL)."""
ABORT_TIMEOUT_S = 10.0
"""How long an engine abort may take before the request's adapter and limits are given back anyway."""

OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0}


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(given: str | None, prefix: str) -> str:
    """A client's request id (``X-Request-Id``, or vLLM's ``request_id`` field) as it names the
    request in responses, logs and the engine; one is made when the client sent none."""
    if given is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    if not _REQUEST_ID.fullmatch(given):
        raise InvalidArgument("a request id is 1-128 characters of letters, digits and ._:@/+=-",
                              field="X-Request-Id")
    return given


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Generation:
    """What a front needs to run and report one request."""

    model: str
    adapter: AdapterRecord | None
    prompts: tuple[list[int], ...]
    sampling: Sampling
    """Resolved: ``max_tokens`` set, unset fields filled."""
    params: object
    """The engine's own sampling parameters, built (and checked by vLLM) once."""
    cache_salt: str | None = None
    fanout: int = 1
    """Greedy n > 1: the engine computes one choice per prompt, sent as n."""

    @property
    def prompt_ids(self) -> list[int]:
        return self.prompts[0]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.sampling.n


class Admission:
    """What an admitted request holds until it ends: its share of the tenant's in-flight limits and
    a reference to its adapter in the engine. :meth:`release` is idempotent, so whichever of the
    stream's ``finally`` and the front's cleanup comes first gives them back."""

    __slots__ = ("_inference", "request_id", "key", "engine_ids", "lease", "entry", "t0", "interrupted", "aborting",
                 "_released")

    def __init__(self, inference: InferenceService, request_id: str, key: tuple[str, str], engine_ids: list[str],
                 lease: Lease, t0: float):
        self._inference, self.request_id, self.key, self.lease, self.t0 = inference, request_id, key, lease, t0
        self.engine_ids = engine_ids
        """vLLM's ids for this request's prompts: ``<tenant>:<request id>`` (``-<i>`` per prompt of
        several). The tenant keeps one tenant's ids from ever naming another's request in vLLM."""
        self.entry: Entry | None = None
        self.interrupted = False
        self.aborting = False
        """Its engine requests are being aborted: it is released once they are gone, not before,
        so that its adapter is never removed under a request the engine may still step."""
        self._released = False

    def release(self) -> None:
        if self._released or self.aborting:
            return
        self._released = True
        self.lease.release()
        if self.entry is not None:
            self._inference.residency.release(self.entry)
        self._inference._finished(self)


class InferenceService:
    def __init__(self, settings, *, engine, prompts, residency, store, metrics, resolve, is_current):
        self.settings = settings
        self.engine = engine
        self.prompts = prompts
        self.residency = residency
        self.store = store
        self.metrics = metrics
        self.resolve = resolve
        self.is_current = is_current
        """Whether an adapter version is still the one its name serves (not deleted or replaced)."""
        self.inflight = InFlightLimiter()
        self.active: dict[tuple[str, str], Admission] = {}
        """Admitted requests not yet finished, by (tenant, request id)."""
        self.draining = False
        self._aborts: set[asyncio.Task] = set()  # engine aborts in flight, referenced until done
        self._salt_key = secrets.token_bytes(32)

    def check_serving(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if not self.engine.ready:
            raise EngineNotReady("the engine is not ready yet")

    # ------------------------------------------------------------ prepare

    def check_prompt_count(self, principal: Principal, count: int, field: str = "prompt") -> None:
        """A request's prompts fan out into one engine request each: bound them before any is
        tokenized, by the server's --max-prompts and by what the tenant may run at once."""
        limit = self.settings.max_prompts
        if not principal.is_admin:
            limit = min(limit, principal.quotas.max_concurrent_requests)
        if count > limit:
            raise InvalidArgument(f"the request has {count} prompts; at most {limit} are taken in one request "
                                  "(each runs as a request of its own); send the rest in another", field=field)

    def prepare(self, principal: Principal, model: str, prompts: list[list[int]], sampling: Sampling, *,
                prompt_field: str, client_ids: bool = False, truncate: int | None = None,
                cache_salt: str | None = None) -> Generation:
        """Every check that needs no engine, in the order a client would want to hear about them."""
        self.check_serving()
        adapter = self.resolve(principal, model)
        limit = self.settings.max_model_len
        if not prompts:
            raise InvalidArgument("the prompt is empty", field=prompt_field)
        self.check_prompt_count(principal, len(prompts), prompt_field)
        checked = []
        for i, ids in enumerate(prompts):
            where = prompt_field if len(prompts) == 1 else f"{prompt_field}[{i}]"
            if not ids:
                raise InvalidArgument("the prompt is empty", field=where)
            if truncate is not None:
                ids = ids[-(limit - 1 if truncate == -1 else truncate):]
            if len(ids) >= limit:
                raise InvalidArgument(f"the prompt is {len(ids)} tokens; this model's context is {limit} tokens "
                                      "(prompt + completion)", field=where)
            if client_ids:  # after the length check: at most a context of ids is walked
                self.prompts.check_ids(ids, where)
            checked.append(ids)
        vocab = self.prompts.vocab_size
        for name, ids in sampling.token_ids().items():
            if len(ids) > vocab:
                raise InvalidArgument(f"{len(ids)} token ids; this model's vocabulary has {vocab}", field=name)
            self.prompts.check_ids(ids, name)
        sampling = self._resolve(sampling, limit - max(len(p) for p in checked))
        # n greedy choices are one choice n times: vLLM (0.3x) refuses n > 1 at temperature 0,
        # OpenAI answers it. The engine computes it once.
        fanout = sampling.n if sampling.n > 1 and sampling.temperature == 0 else 1
        engine_sampling = dataclasses.replace(sampling, n=1) if fanout > 1 else sampling
        return Generation(model, adapter, tuple(checked), sampling, self.engine.sampling_params(engine_sampling),
                          self.cache_salt(principal, cache_salt), fanout)

    def cache_salt(self, principal: Principal, client: str | None) -> str | None:
        """vLLM's ``cache_salt`` for a request: the tenant's own, with the client's inside it, so that
        no tenant reuses (or can time) another's cached prefixes; one for all the tenants an
        operator lets share (--shared-prefix-cache-tenants), with the client's inside it."""
        if not self.settings.enable_prefix_caching:
            return client
        # Keyed by a secret of this process (each engine has its own cache), so that no client can
        # compute, and send, another tenant's salt; the shared tenants' salts are made the same way.
        owner = SHARED_SALT if principal.tenant in self.settings.shared_prefix_cache_tenants else principal.tenant
        return hmac.new(self._salt_key, json.dumps([owner, client]).encode(), hashlib.sha256).hexdigest()

    def _resolve(self, s: Sampling, room: int) -> Sampling:
        """Unset fields from the base's generation config, else OpenAI's defaults; max_tokens
        within the context."""
        defaults = self.prompts.defaults
        filled = {k: defaults.get(k, v) for k, v in OPENAI_DEFAULTS.items() if getattr(s, k) is None}
        max_tokens = s.max_tokens
        if max_tokens is None:
            max_tokens = min(room, defaults.get("max_tokens", room))
        elif max_tokens > room:
            raise InvalidArgument(f"max_tokens is {max_tokens}, but the prompt leaves room for {room} of this "
                                  f"model's {self.settings.max_model_len}-token context", field="max_tokens")
        return dataclasses.replace(s, max_tokens=max_tokens, **filled)

    # ------------------------------------------------------------ admit

    async def admit(self, principal: Principal, gen: Generation, *, protocol: str, endpoint: str,
                    request_id: str) -> Admission:
        t0 = time.perf_counter()
        series = self.metrics.series(protocol, principal.tenant, gen.adapter.name if gen.adapter else None)
        key = (principal.tenant, request_id)
        try:
            self.check_serving()
            if key in self.active:
                raise Conflict(f"a request with id {request_id!r} is already running; request ids are unique while "
                               "in flight", field="X-Request-Id")
            lease = self.inflight.admit(principal, gen.sampling.max_tokens * gen.choices, len(gen.prompts))
        except LoraplexError:
            series.requests(endpoint, "rejected").inc()
            raise
        engine_ids = [f"{principal.tenant}:{request_id}"] if len(gen.prompts) == 1 else \
            [f"{principal.tenant}:{request_id}-{i}" for i in range(len(gen.prompts))]
        admission = Admission(self, request_id, key, engine_ids, lease, t0)
        self.active[key] = admission
        try:
            if (rec := gen.adapter) is not None:
                # A cold adapter's blob comes from the store first (object storage: into this
                # server's cache, verified; a store that does not answer is a 503).
                path = self.store.path(rec.digest) if self.residency.get(rec.key) else \
                    await self.store.local(rec.digest)
                admission.entry = await self.residency.acquire(rec.key, str(path), rec.size_bytes,
                                                               digest=rec.digest, pinned=rec.pinned)
                if not self.is_current(rec):
                    # Deleted or replaced while this request waited for room: it runs on the version
                    # it resolved, as one already running would, and that version drains after it.
                    await self.residency.retire(rec.key)
        except BaseException:
            admission.release()
            series.requests(endpoint, "rejected").inc()
            raise
        return admission

    def _finished(self, admission: Admission) -> None:
        if self.active.get(admission.key) is admission:
            del self.active[admission.key]

    # ------------------------------------------------------------ generate

    async def generate(self, principal: Principal, gen: Generation, admission: Admission, *, protocol: str,
                       endpoint: str) -> AsyncIterator[Completion]:
        """Stream deltas of an admitted request; its admission is released when this ends.
        Closing the stream early aborts the vLLM request(s)."""
        m = self.metrics.series(protocol, principal.tenant, gen.adapter.name if gen.adapter else None)
        t0, entry = admission.t0, admission.entry
        status, finished, n_out, first = "error", False, 0, None
        ids = admission.engine_ids
        try:
            lora = (entry.lora_name, entry.lora_id, entry.path) if entry is not None else None
            m.queue.observe(time.perf_counter() - t0)
            streams = [self.engine.generate(p, gen.params, rid, lora=lora, cache_salt=gen.cache_salt)
                       for p, rid in zip(gen.prompts, ids)]
            per_prompt = gen.sampling.n // gen.fanout
            deltas = streams[0] if len(streams) == 1 else _merge(streams, per_prompt)
            async for delta in deltas:
                if admission.interrupted:
                    break  # the drain's grace is over: end now, with the error below
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                    m.ttft.observe(first - t0)
                n_out += len(delta.token_ids)
                if gen.fanout == 1:
                    yield delta
                else:
                    for j in range(gen.fanout):
                        yield dataclasses.replace(delta, index=delta.index * gen.fanout + j)
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
            # released. The aborts go to a task of their own.
            if finished:
                admission.release()
            else:
                self._abort_soon(ids, admission)
            end = time.perf_counter()
            m.requests(endpoint, status).inc()
            m.e2e.observe(end - t0)
            m.tokens_in.inc(gen.prompt_tokens)
            m.tokens_out.inc(n_out)
            if first is not None and n_out > 1:
                m.tpot.observe((end - first) / (n_out - 1))

    def _abort_soon(self, request_ids: list[str], admission: Admission | None = None) -> None:
        """Abort the engine requests in a task of their own, then release ``admission``: an adapter
        released first could be removed while the engine still steps a request that uses it."""
        task = asyncio.get_running_loop().create_task(self._abort(request_ids, admission))
        if admission is not None:
            admission.aborting = True
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, request_ids: list[str], admission: Admission | None) -> None:
        try:  # all at once, bounded: an engine that never answers must not hold the tenant's slots
            results = await asyncio.wait_for(asyncio.gather(*(self.engine.abort(r) for r in request_ids),
                                                            return_exceptions=True), ABORT_TIMEOUT_S)
            for rid, r in zip(request_ids, results):
                if isinstance(r, Exception):
                    logger.debug("abort of %s failed: %r", rid, r)
        except Exception:
            logger.debug("aborts of %s failed", request_ids, exc_info=True)
        finally:
            if admission is not None:
                admission.aborting = False
                admission.release()

    # ------------------------------------------------------------ drain

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
        cut = list(self.active.values())
        for admission in cut:
            admission.interrupted = True
            self._abort_soon(admission.engine_ids)
        if cut:
            logger.warning("drain: %d requests still running after %.0f s; ending them", len(cut), grace_s)
            while self.active and loop.time() < deadline + 5:  # their streams end with the error event
                await asyncio.sleep(0.05)
        return len(cut)


async def _merge(streams: list[AsyncIterator[Completion]], n: int) -> AsyncIterator[Completion]:
    """Several prompts' streams as one, choice indices offset by ``prompt * n``."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[Completion]) -> None:
        try:
            async for d in stream:
                await queue.put(dataclasses.replace(d, index=i * n + d.index))
            await queue.put(done)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            await queue.put(e)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
