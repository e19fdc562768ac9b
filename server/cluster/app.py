"""loraplex as a Ray Serve application: one ingress deployment in front of N engine replicas.

::

    clients --> LoraplexIngress      the key, a bounded body and the request rate (the same guard
                  |                  as python -m server); which adapter version the request is for
                  |  handle.options(multiplexed_model_id="<tenant>/<name>@<version>", stream=True)
                  v                  <- Ray sends it to a replica that holds that version
                LoraplexEngine x N   each the whole single-process server (server.runtime.build):
                                     its own vLLM engine, the service layer, the FastAPI app,
                                     over the shared registry and adapter store

**One contract.** A replica answers every request with the same ASGI app as ``python -m
server`` (the ingress forwards it whole and relays the response, streamed): tenants, keys,
quotas, validation, errors and per-replica metrics are that code's, not a copy. The ingress
only authenticates first (so a request without a key costs no replica anything), charges the
tenant's rate once, and names the adapter version as Ray's multiplexed model id.

**Affinity.** Ray routes a multiplexed id to a replica that has loaded it, and to a less busy
one when that replica is saturated; the replica's loader (:meth:`LoraplexEngine._load`) puts
the version in its engine's host tier, and Ray's eviction (past ``max_num_models_per_replica``,
the replica's host tier size) unloads it when idle. A replaced version has a new id; the old one
drains out of every replica as it does in one process (each replica watches the registry).
Responses carry ``x-loraplex-replica``.

**Failures.** A replica whose engine died fails ``check_health``, and Ray replaces it. Requests
it was running end with the server's own in-band error; a request that had not started yet is
retried on another replica (``x-loraplex-engine: dead`` or a replica that is gone), and one whose
replica died mid-response ends with 503 ``replica_lost`` (in the stream, as an error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.handle import DeploymentHandle

from server.api.http.errors import body as error_body, error_response, status_of
from server.config import Settings
from server.errors import LoraplexError, ReplicaLost, ShuttingDown

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"
ENGINE_HEADER = "x-loraplex-engine"
"""Set to ``dead`` on an answer from a replica whose engine is down: the ingress tries another."""
ATTEMPTS = 3
"""Tries per request on replicas that are gone or whose engine is down, before a 503."""
_INFERENCE = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
"""Paths whose JSON body names a model: routed by adapter version."""
_WRITES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
"""Paths that write the registry: once one answers, this ingress routes by what it wrote."""


class LoraplexEngine:
    """One engine replica: the single-process server, driven through its ASGI app."""

    async def __init__(self, settings: dict[str, Any]):
        from server.api.http.app import create_app
        from server.runtime import build, watch_registry

        self.settings = Settings(**settings)
        self.service = await asyncio.to_thread(build, self.settings, shared=True)
        self.app = create_app(self.service)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id if context else "local"
        # Ray's per-replica model cache is the engine's host tier; wired here because its size
        # is a setting (Ray supports multiplexing set up at init).
        self.adapter = serve.multiplexed(max_num_models_per_replica=self.service.residency.max_entries)(self._loader())
        self._tasks = [asyncio.create_task(watch_registry(self.service)),
                       asyncio.create_task(self.service.adapters.gc_forever())]
        logger.info("engine replica %s ready", self.replica)

    def _loader(self):
        async def load(model_id: str) -> _Resident:
            return await self._load(model_id)
        return load

    async def _load(self, model_id: str) -> _Resident:
        """Ray's multiplexed loader: put the version in this engine now. Never raises: the
        request itself then answers as the single-process server would (404, 503...)."""
        await self.service.refresh()  # the ingress may have seen a write this replica has not yet
        record = next((r for r in self.service._adapters().values() if r.key == model_id), None)
        if record is not None:
            try:
                await self.service.adapters.warm(record, wait=True)
            except LoraplexError as e:
                logger.info("warming %s: %s", model_id, e.message)
        return _Resident(self.service, model_id)

    async def check_health(self) -> None:
        """Ray's health check: a dead engine fails it, and Ray replaces this replica."""
        if self.service.engine.dead:
            raise RuntimeError("the vLLM engine of this replica died")

    async def served_name(self) -> str:
        return self.service.served_name

    async def http(self, request: dict[str, Any]) -> AsyncIterator[dict | bytes]:
        """Run one HTTP request through the server's ASGI app. Yields the response start
        (``{"status", "headers"}``), then body chunks as the app sends them. Closing the
        generator (the client left, the ingress cancelled) cancels the request, which aborts it
        in the engine."""
        if self.service._snapshot_gen < request.get("generation", -1):
            await self.service.refresh()  # the ingress saw a write this replica has not loaded yet
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        sent_body = False
        gone = asyncio.Event()
        queue: asyncio.Queue = asyncio.Queue()

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await queue.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": request["method"], "scheme": "http", "path": request["path"],
                 "raw_path": request["path"].encode(), "query_string": request["query_string"],
                 "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
                 "client": tuple(request["client"]) if request.get("client") else None,
                 "server": None, "extensions": {"loraplex.charged": True}, "state": {}}
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (message := await queue.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    headers.append((REPLICA_HEADER, self.replica))
                    if self.service.engine.dead:
                        headers.append((ENGINE_HEADER, "dead"))
                    yield {"status": message["status"], "headers": headers}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        break
        finally:
            gone.set()
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task

    def __del__(self) -> None:
        # Ray calls it when it stops the replica: stop vLLM's engine-core process with it.
        service = getattr(self, "service", None)
        if service is not None:
            service.engine.shutdown()


class _Resident:
    """What Ray's multiplexed cache holds for one adapter version; evicting it unloads that
    version from the engine if no request is using it."""

    def __init__(self, service, key: str):
        self.service, self.key = service, key

    async def __del__(self) -> None:
        await self.service.residency.unload_if_idle(self.key)


class LoraplexIngress:
    """The HTTP front of the cluster: the guard of ``python -m server``, then a forward."""

    async def __init__(self, engine: DeploymentHandle, settings: dict[str, Any]):
        from server.adapters.registry import AdapterRegistry
        from server.runtime import open_db
        from server.tenants.auth import Authenticator
        from server.tenants.ratelimit import RateLimiter, SharedRateLimiter
        from server.tenants.store import TenantStore

        self.settings = Settings(**settings)
        self.engine = engine
        db = await asyncio.to_thread(open_db, self.settings)
        self.registry = AdapterRegistry(db)
        self.auth = Authenticator(TenantStore(db))
        self.limiter = SharedRateLimiter(self.settings.rate_limit_url) if self.settings.rate_limit_url \
            else RateLimiter()
        self.draining = False
        self._snapshot: dict = {}
        self._generation = -1
        self._reloading = asyncio.Lock()
        self.served = await engine.served_name.remote()
        await self._reload()
        self._watch = asyncio.create_task(self._watch_registry())

    def __serve_build_asgi_app__(self):
        from server.api.http.guard import RequestGuard

        return RequestGuard(self._forward, service=self)

    # ------------------------------------------------------------ what the guard needs

    async def authenticate(self, authorization: str | None, *, charge: bool = True):
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.registry.generation != self._generation or self.auth.stale:
            await self._reload()
        principal = self.auth.authenticate(authorization)
        if charge:
            await self.limiter.check(principal)
        return principal

    # ------------------------------------------------------------ the registry snapshot

    async def _reload(self) -> None:
        async with self._reloading:
            generation = self.registry.generation
            if generation != self._generation:
                self._snapshot = await asyncio.to_thread(self.registry.snapshot)
                self._generation = generation
            if self.auth.stale:
                await asyncio.to_thread(self.auth.reload)

    async def _watch_registry(self) -> None:
        from server.runtime import REGISTRY_POLL_S

        while True:
            await asyncio.sleep(REGISTRY_POLL_S)
            with contextlib.suppress(Exception):  # the replicas report a registry outage
                await asyncio.to_thread(self.registry.poll)
                await self._reload()

    def model_id(self, scope: dict, body: bytes) -> str:
        """The adapter version a request is for (Ray's multiplexed model id), or "" for the base,
        a management call, or a body the replica will refuse."""
        if scope["method"] != "POST" or scope["path"] not in _INFERENCE:
            return ""
        try:
            model = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return ""
        principal = scope.get("state", {}).get("principal")
        if not isinstance(model, str) or model == self.served or principal is None:
            return ""
        record = self._snapshot.get((principal.tenant, model.removeprefix(self.served + ":")))
        return record.key if record is not None else ""

    # ------------------------------------------------------------ the forward

    async def _forward(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        chunks = []
        while True:  # the guard bounded it (and read a JSON body whole already)
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        request = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
                   "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                   "body": body, "client": list(scope["client"]) if scope.get("client") else None}
        request["generation"] = self._generation
        model_id = self.model_id(scope, body)
        stream, start = None, None
        for attempt in range(ATTEMPTS):
            stream = self.engine.options(stream=True, multiplexed_model_id=model_id).http.remote(request)
            try:
                start = await stream.__anext__()
            except (RayActorError, ActorUnavailableError) as e:
                logger.warning("replica gone before answering (try %d of %d): %s", attempt + 1, ATTEMPTS, e)
                start = None
                continue
            except RayError:
                logger.exception("forwarding %s %s failed", scope["method"], scope["path"])
                return await _send_error(send, LoraplexError("the request failed inside the engine replica"), 500)
            if (ENGINE_HEADER, "dead") in start["headers"] and attempt + 1 < ATTEMPTS:
                stream.cancel()
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            break
        if start is None:
            return await _send_error(send, ReplicaLost("no engine replica answered; retry"))
        if scope["method"] != "GET" and scope["path"].startswith(_WRITES):
            await asyncio.to_thread(self.registry.poll)  # the write is acknowledged: route by it from now on
            await self._reload()
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in start["headers"] if k != ENGINE_HEADER]
        await send({"type": "http.response.start", "status": start["status"], "headers": headers})
        sse = any(k == "content-type" and v.startswith("text/event-stream") for k, v in start["headers"])
        try:
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (RayActorError, ActorUnavailableError):
            logger.warning("the replica running %s %s died mid-response", scope["method"], scope["path"])
            if sse:
                lost = ReplicaLost("the engine replica running this request died; retry it")
                event = error_body(lost.message, lost.type, lost.field, lost.code) | {"status": status_of(lost)}
                await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode(),
                            "more_body": True})
        finally:
            stream.cancel()  # a client that left: the replica's generator closes, the engine aborts
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send, exc: LoraplexError, status: int | None = None) -> None:
    response = error_response(exc)
    if status is not None:
        response.status_code = status
    await response({"type": "http"}, _never, send)


async def _never() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# ---------------------------------------------------------------- the application


def deployments(settings: Settings, *, replicas: int | None = None):
    """The two deployments with their defaults (a Serve config's ``deployments`` override them)."""
    import torch

    gpu = torch.cuda.is_available()
    engine = serve.deployment(
        LoraplexEngine, name="LoraplexEngine",
        num_replicas=replicas or 1,
        ray_actor_options={"num_cpus": 1, "num_gpus": 1} if gpu else {"num_cpus": 1},
        max_ongoing_requests=settings.replica_max_ongoing_requests or 2 * (settings.max_num_seqs or 128),
        health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + 15)
    ingress = serve.deployment(serve.ingress()(LoraplexIngress), name="LoraplexIngress",
                               ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
    return ingress, engine


def build(args: dict[str, Any] | None = None, *, replicas: int | None = None):
    """The Serve application (``import_path: server.cluster.app:build``). ``args`` are
    ``python -m server``'s settings by their field names (``max_loras: 8``); each replica also
    reads its own LORAPLEX_* environment (secrets: the registry, store and Redis URLs)."""
    args = dict(args or {})
    settings = Settings(**args)  # a bad setting fails `serve run`, not every replica
    unsupported = {"lora_modules": "upload adapters through the API",
                   "grpc_port": "the gRPC front runs with python -m server only, for now",
                   "metrics_port": "each replica's /metrics is on the HTTP front (admin key); Ray exports its own",
                   "ssl_certfile": "terminate TLS in front of Ray's proxy"}
    for field, why in unsupported.items():
        if getattr(settings, field):
            raise ValueError(f"--{field.replace('_', '-')} is not supported on Ray Serve: {why}")
    ingress, engine = deployments(settings, replicas=replicas)
    return ingress.bind(engine.bind(args), args)


def run(settings: Settings, replicas: int) -> None:
    """``python -m server --replicas N``: a local Ray cluster, N engine replicas, the HTTP front
    on --host/--port. SIGTERM or Ctrl-C stops the application (each replica drains for Ray's
    graceful shutdown timeout) and the local cluster."""
    import os
    import signal

    import ray

    args = settings.model_dump(mode="json", exclude_unset=True, exclude={"replicas", "config"})
    args.setdefault("data_dir", str(settings.data_dir))  # one data directory for every replica
    app = build(args, replicas=replicas)

    def stop(signum, frame):
        raise KeyboardInterrupt

    ray.init(num_cpus=max(os.cpu_count() or 1, replicas + 1), include_dashboard=False,
             logging_level=logging.WARNING)
    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs its own
    node = ray.get_runtime_context().get_node_id()
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name="loraplex", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        _reap(node)


def _reap(node_id: str, timeout: float = 10.0) -> None:
    """What the local cluster left behind: Ray's per-node agents outlive ray.shutdown (they are
    re-parented to init), so find them by the node id in their environment."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("RAY_NODE_ID") == node_id and p not in children:
                children.append(p)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
