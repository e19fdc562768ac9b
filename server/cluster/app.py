"""loraplex as a Ray Serve application: one ingress deployment in front of N engine replicas.

::

    clients --> LoraplexIngress      the key, a bounded body and the request rate (the same guard
                  |                  as python -m server); which adapter version the request is for
                  |  handle.options(multiplexed_model_id=<hash of the adapter version>, stream=True)
                  v                  <- Ray sends it to a replica that holds that version
                LoraplexEngine x N   each the whole single-process server (server.runtime.build):
                                     its own vLLM engine, the service layer, the FastAPI app,
                                     over the shared registry and adapter store

**One contract.** A replica answers every request with the same ASGI app as ``python -m
server`` (the ingress forwards it whole and relays the response, streamed): tenants, keys,
quotas, validation, errors and per-replica metrics are that code's, not a copy. The ingress
only authenticates first (so a request without a key costs no replica anything), charges the
tenant's rate once, and names the adapter version as Ray's multiplexed model id (an opaque
hash: Ray exports that id on metrics that need no key, :func:`multiplex_id`). An upload is
also refused here for a taken name or a full quota before its files' bytes (the single server's
check), and crosses to the replica in 1 MiB Ray objects as it arrives, never whole in the
ingress (:meth:`LoraplexIngress._upload_body`).

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
import hashlib
import json
import logging
import secrets
import time
from typing import Any, AsyncIterator

import grpc
import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import QueryParams

from server.adapters.registry import AdapterRecord
from server.adapters.uploads import UploadSlots, check_upload
from server.api.http.body import INLINE_BYTES, off_loop, top_level_string
from server.api.http.errors import body as error_body, error_response, status_of
from server.api.http.multipart import FormFields, before_files
from server.config import Settings
from server.errors import LoraplexError, PayloadTooLarge, ReplicaLost, ShuttingDown, StagingFull, Unauthenticated
from server.service import UNKNOWN_KEY_POLL_S

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loraplex-replica"
ENGINE_HEADER = "x-loraplex-engine"
"""Set to ``dead`` on an answer from a replica whose engine is down: the ingress tries another."""
HEALTH_CHECK_PERIOD_S = 2
"""How often Ray asks each engine replica's ``check_health``: a dead engine is replaced from then on."""
RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 2.0)
"""Waits before each retry of a request whose replica is gone or whose engine is down. Ray routes to the
least-busy replica, and one whose engine died is the least busy until a health check removes it, so
the retries span more than two health-check periods (5.7 s) rather than a few tries that all land
on the same dead replica."""
ATTEMPTS = len(RETRY_BACKOFF_S) + 1
"""Tries per request on replicas that are gone or whose engine is down, before a 503."""
UPLOAD_PIECE_BYTES = 1 << 20
"""An upload crosses from the ingress to a replica in Ray objects of about this size: each goes to
the object store (over Ray's 100 KiB inline size), and the ingress holds about three pieces of
each upload at once (the one filling, its pickle, its copy into the store)."""
_INFERENCE = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
"""Paths whose JSON body names a model: routed by adapter version."""
_WRITES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
"""Paths that write the registry: once one answers, this ingress routes by what it wrote."""
GRPC_METHODS = {
    "/loraplex.v1.Inference/Generate": "unary_stream",
    "/loraplex.v1.Inference/Chat": "unary_stream",
    "/loraplex.v1.Inference/ListModels": "unary_unary",
    "/loraplex.v1.Adapters/Upload": "stream_unary",
    "/loraplex.v1.Adapters/List": "unary_unary",
    "/loraplex.v1.Adapters/Get": "unary_unary",
    "/loraplex.v1.Adapters/Replace": "stream_unary",
    "/loraplex.v1.Adapters/Delete": "unary_unary",
    "/loraplex.v1.Adapters/Pin": "unary_unary",
    "/loraplex.v1.Adapters/Unpin": "unary_unary",
}
"""Every loraplex.v1 method and its shape (tests/integration/test_ray_cluster.py checks the
list against the services' descriptors)."""
_GRPC_WRITES = ("/loraplex.v1.Adapters/Upload", "/loraplex.v1.Adapters/Replace", "/loraplex.v1.Adapters/Delete",
                "/loraplex.v1.Adapters/Pin", "/loraplex.v1.Adapters/Unpin")
"""The gRPC methods that write the registry (as :data:`_WRITES`)."""


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
        # The gRPC front runs in the ingress; a replica answers it with the single-process server's
        # own servicers, on a loopback port only this replica calls (its secret marks the calls
        # whose rate the ingress charged).
        from server.api.grpc.server import MAX_MESSAGE_BYTES, start_grpc

        self.service.forward_secret = secrets.token_hex(16)
        self._grpc = await start_grpc(self.service, "127.0.0.1", 0)
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{self._grpc.port}", options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        logger.info("engine replica %s ready", self.replica)

    def _loader(self):
        async def load(model_id: str) -> _Resident:
            return await self._load(model_id)
        return load

    async def _load(self, model_id: str) -> _Resident:
        """Ray's multiplexed loader: put the version in this engine now. Never raises: the
        request itself then answers as the single-process server would (404, 503...)."""
        await self.service.refresh()  # the ingress may have seen a write this replica has not yet
        record = next((r for r in self.service._adapters().values() if multiplex_id(r) == model_id), None)
        if record is None:
            return _Resident(self.service, None)
        try:
            await self.service.adapters.warm(record, wait=True)
        except LoraplexError as e:
            logger.info("warming %s: %s", record.key, e.message)
        return _Resident(self.service, record.key)

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
        pieces = list(request.get("body_pieces") or ()) or [request["body"]]  # an upload: Ray objects
        gone = asyncio.Event()
        queue: asyncio.Queue = asyncio.Queue()

        async def receive() -> dict:
            if pieces:
                piece = pieces.pop(0)
                body = piece if isinstance(piece, bytes) else await piece
                return {"type": "http.request", "body": body, "more_body": bool(pieces)}
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
                    # What the app has sent meanwhile goes as one item: each item is a Ray
                    # object, and a busy replica's stream chunks pile up between reads.
                    body, more = [message.get("body", b"")], message.get("more_body", False)
                    while more and not queue.empty():
                        nxt = queue.get_nowait()
                        if nxt is None or nxt["type"] != "http.response.body":
                            queue.put_nowait(nxt)  # the end: seen on the next turn of the loop
                            break
                        body.append(nxt.get("body", b""))
                        more = nxt.get("more_body", False)
                    if any(body):
                        yield b"".join(body)
                    if not more:
                        break
        finally:
            gone.set()
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def grpc(self, request: dict[str, Any]) -> AsyncIterator[dict | bytes]:
        """Run one gRPC call through this replica's own gRPC servicers. Yields ``{"initial":
        metadata}``, the response messages (serialized), then ``{"trailing": ...}`` or, for a
        call that failed, ``{"code", "details", "trailing"}``."""
        if self.service._snapshot_gen < request.get("generation", -1):
            await self.service.refresh()
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.adapter(model_id)
        from server.api.grpc.protocol import FORWARDED

        method, kind, messages = request["method"], GRPC_METHODS[request["method"]], request["messages"]
        metadata = (*request["metadata"], (FORWARDED, self.service.forward_secret))
        raw = {"request_serializer": None, "response_deserializer": None}
        opened = False
        if kind == "unary_stream":
            call = self._channel.unary_stream(method, **raw)(messages[0], metadata=metadata)
        elif kind == "unary_unary":
            call = self._channel.unary_unary(method, **raw)(messages[0], metadata=metadata)
        else:  # an upload: its messages in Ray objects, a batch each
            call = self._channel.stream_unary(method, **raw)(_unbatch(messages), metadata=metadata)
        try:
            initial = tuple(await call.initial_metadata() or ())
            yield {"initial": [*initial, (REPLICA_HEADER, self.replica)]}
            opened = True
            if kind == "unary_stream":
                async for message in call:
                    yield message
            else:
                yield await call
            yield {"trailing": list(await call.trailing_metadata() or ())}
        except grpc.aio.AioRpcError as e:
            if not opened:
                yield {"initial": [(REPLICA_HEADER, self.replica)]}
            yield {"code": e.code().name, "details": e.details() or "", "trailing": list(e.trailing_metadata() or ()),
                   "engine_dead": self.service.engine.dead}
        finally:
            if not call.done():
                call.cancel()

    def __del__(self) -> None:
        # Ray calls it when it stops the replica: stop vLLM's engine-core process with it.
        service = getattr(self, "service", None)
        if service is not None:
            service.engine.shutdown()


async def _put(value) -> ray.ObjectRef:
    """``ray.put`` off the loop. An object store that cannot take an upload's piece now (full,
    out of disk to spill to) is a 503 to retry, not a 500."""
    try:
        return await asyncio.to_thread(ray.put, value)
    except RayError as e:
        raise StagingFull(f"the cluster's object store cannot take this upload now ({type(e).__name__}); "
                          "retry later") from None


async def _unbatch(batches: list) -> AsyncIterator[bytes]:
    for batch in batches:
        for message in await batch:
            yield message


def _is_upload(method: str, path: str) -> bool:
    """POST /v1/adapters and PUT /v1/adapters/{name}: a body of adapter files."""
    return (method == "POST" and path == "/v1/adapters") or (method == "PUT" and path.startswith("/v1/adapters/")
                                                                and path.count("/") == 3 and not path.endswith("/"))


def multiplex_id(record: AdapterRecord) -> str:
    """The adapter version's name to Ray: Ray exports it on its own metrics and dashboard, which
    need no key, so it names no tenant and no adapter. A hash of the version's key and its
    digest (only whoever has the adapter's files can compute it)."""
    return hashlib.sha256(f"{record.key}\0{record.digest}".encode()).hexdigest()[:24]


class _Resident:
    """What Ray's multiplexed cache holds for one adapter version; evicting it unloads that
    version from the engine if no request is using it."""

    def __init__(self, service, key: str | None):
        self.service, self.key = service, key

    async def __del__(self) -> None:
        if self.key is not None:
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
        self.tenants = TenantStore(db)
        self.auth = Authenticator(self.tenants)
        # Uploads pass through this process in pieces, to Ray's object store: counted here, not sized
        # (the replica that stages one reserves its disk).
        self.uploads = UploadSlots(self.settings)
        self.limiter = SharedRateLimiter(self.settings.rate_limit_url) if self.settings.rate_limit_url \
            else RateLimiter()
        self.draining = False
        self._snapshot: dict = {}
        self._generation = -1
        self._reloading = asyncio.Lock()
        self._polled_at = 0.0
        self.served = await engine.served_name.remote()
        await self._reload()
        self._watch = asyncio.create_task(self._watch_registry())
        self._grpc = None
        if self.settings.grpc_port is not None:
            self._grpc = await _start_grpc_front(self, self.settings.host, self.settings.grpc_port)

    def __serve_build_asgi_app__(self):
        from server.api.http.guard import RequestGuard

        return RequestGuard(self._forward, service=self)

    # ------------------------------------------------------------ what the guard needs

    async def authenticate(self, authorization: str | None, *, charge: bool = True):
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.registry.generation != self._generation or self.auth.stale:
            await self._reload()
        try:
            principal = self.auth.authenticate(authorization)
        except Unauthenticated:  # a key made a moment ago: read the registry now, at most every 0.1 s
            if time.monotonic() - self._polled_at < UNKNOWN_KEY_POLL_S:
                raise
            self._polled_at = time.monotonic()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.registry.poll)
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

    async def model_id(self, scope: dict, body: bytes) -> str:
        """The adapter version a request is for (Ray's multiplexed model id), or "" for the base,
        a management call, or a body the replica will refuse (its 400 says why).

        Only ``model`` is read, a piece at a time, and a large body in a worker thread: the replica
        parses the whole body off its own loop, and this loop serves every tenant's requests."""
        if scope["method"] != "POST" or scope["path"] not in _INFERENCE:
            return ""
        if len(body) > INLINE_BYTES:
            model = await off_loop(top_level_string, body, "model")
        else:
            model = top_level_string(body, "model")
        principal = scope.get("state", {}).get("principal")
        if not isinstance(model, str) or model == self.served or principal is None:
            return ""
        record = self._snapshot.get((principal.tenant, model.removeprefix(self.served + ":")))
        return multiplex_id(record) if record is not None else ""

    async def _after_write(self) -> None:
        """A write a replica acknowledged: route by it from now on. The write is done; a registry
        that does not answer now only delays this to the next poll, never fails the response."""
        try:
            await asyncio.to_thread(self.registry.poll)
            await self._reload()
        except Exception:
            logger.warning("the registry did not answer after a write; routing catches up on the next poll",
                           exc_info=True)

    # ------------------------------------------------------------ the forward

    async def _forward(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return
        principal = scope.get("state", {}).get("principal")
        try:
            if principal is not None and _is_upload(scope["method"], scope["path"]):
                with self.uploads.hold(principal):  # bounded as the replica bounds its own
                    if (pieces := await self._upload_body(scope, receive, principal)) is not None:
                        await self._relay(scope, send, b"", pieces)
                return
            chunks = []
            while True:  # the guard bounds it: over the cap (413) or stalled (408) raises here
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
        except LoraplexError as e:
            return await _send_error(send, e)
        await self._relay(scope, send, b"".join(chunks))

    async def _upload_body(self, scope, receive, principal) -> list | None:
        """An upload's body, in Ray objects of :data:`UPLOAD_PIECE_BYTES` put as it arrives: this
        process holds a few pieces of it, not the upload, however many arrive at once. Its name and
        quota are checked as soon as the form names them, before the files' bytes, with the single
        server's :func:`check_upload`; None if the client left."""
        query = QueryParams(scope.get("query_string", b""))  # as FastAPI reads it on the replica
        replace = scope["method"] == "PUT"

        def check(name: str, tenant: str | None) -> None:
            self._check_upload(principal, name, tenant, replace=replace)

        headers = dict((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"])
        fields = FormFields(headers.get("content-type", ""), before_files(
            check, name=scope["path"].rsplit("/", 1)[1] if replace else None, tenant=query.get("tenant")))
        pieces, piece, size = [], [], 0
        while True:  # the guard bounds it: over the cap (413) or stalled (408) raises here
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk, more = message.get("body", b""), message.get("more_body", False)
            await fields.feed(chunk, more=more)
            piece.append(chunk)
            size += len(chunk)
            if size >= UPLOAD_PIECE_BYTES or (size and not more):
                pieces.append(await _put(b"".join(piece)))
                piece, size = [], 0
            if not more:
                return pieces

    def _check_upload(self, principal, name: str, tenant: str | None, *, replace: bool) -> None:
        """:func:`check_upload`; it reads the registry, so callers run it in a worker thread."""
        try:
            check_upload(self.registry, self.tenants, principal, name, tenant, replace=replace)
        except LoraplexError:
            raise
        except Exception:  # the registry does not answer: the replica checks again, and says so
            logger.warning("checking an upload's name before its bytes failed", exc_info=True)

    async def _relay(self, scope, send, body: bytes, pieces: list | None = None) -> None:
        request = {"method": scope["method"], "path": scope["path"], "query_string": scope.get("query_string", b""),
                   "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                   "body": body, "body_pieces": pieces, "client": list(scope["client"]) if scope.get("client") else None}
        request["generation"] = self._generation
        model_id = await self.model_id(scope, body)
        stream, start = None, None
        for attempt in range(ATTEMPTS):
            stream = self.engine.options(stream=True, multiplexed_model_id=model_id).http.remote(request)
            try:
                start = await stream.__anext__()
            except (RayActorError, ActorUnavailableError, StopAsyncIteration) as e:
                logger.warning("replica gone before answering (try %d of %d): %r", attempt + 1, ATTEMPTS, e)
                start = None
                continue
            except RayError:
                logger.exception("forwarding %s %s failed", scope["method"], scope["path"])
                return await _send_error(send, LoraplexError("the request failed inside the engine replica"), 500)
            if (ENGINE_HEADER, "dead") in start["headers"] and attempt + 1 < ATTEMPTS:
                stream.cancel()
                await asyncio.sleep(RETRY_BACKOFF_S[attempt])
                continue
            break
        if start is None:
            return await _send_error(send, ReplicaLost("no engine replica answered; retry"))
        if scope["method"] != "GET" and scope["path"].startswith(_WRITES):
            await self._after_write()
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


    # ------------------------------------------------------------ the gRPC forward

    async def _upload_messages(self, method: str, request, principal) -> list:
        """An Upload or Replace stream, bounded as HTTP bounds an upload, in Ray objects of about
        :data:`UPLOAD_PIECE_BYTES` of messages each. Its first message names the adapter: a taken
        name or a full quota is refused there, before the files' bytes, as on the single server."""
        from server.api.grpc.pb import adapters_pb2 as apb
        from server.api.grpc.protocol import next_message, tenant

        batches, batch, size, total = [], [], 0, 0
        cap = self.settings.max_upload_bytes + (1 << 20)
        while (message := await next_message(request, self.settings.body_timeout_s)) is not None:
            if not batches and not batch:
                first = None
                with contextlib.suppress(Exception):  # not metadata: the replica says why
                    first = apb.UploadRequest.FromString(message)
                if first is not None and first.WhichOneof("part") == "metadata":
                    meta = first.metadata
                    await asyncio.to_thread(self._check_upload, principal, meta.name, tenant(meta),
                                            replace=meta.replace or method.endswith("/Replace"))
            total += len(message)
            if total > cap:
                raise PayloadTooLarge(f"upload over {self.settings.max_upload_bytes} bytes "
                                      "(--max-upload-bytes)", field="chunk")
            batch.append(message)
            size += len(message)
            if size >= UPLOAD_PIECE_BYTES:
                batches.append(await _put(batch))
                batch, size = [], 0
        if batch:
            batches.append(await _put(batch))
        return batches

    async def forward_grpc(self, method: str, kind: str, request, context: grpc.aio.ServicerContext):
        """One loraplex.v1 call: authenticated and charged here, then run by a replica's own
        servicers; its messages, metadata and status are relayed as they come."""
        from server.api.grpc.pb import inference_pb2 as ipb
        from server.api.grpc.protocol import FORWARDED
        from server.api.grpc.server import MAX_MESSAGE_BYTES

        metadata = [(k, v) for k, v in context.invocation_metadata() or () if k != FORWARDED]
        principal = await self.authenticate(next((v for k, v in metadata if k == "authorization"), None))
        held = self.uploads.hold(principal, field="chunk") if kind == "stream_unary" else contextlib.nullcontext()
        with held:
            if kind == "stream_unary":
                messages = await self._upload_messages(method, request, principal)
            else:
                messages = [request]
            model_id = ""
            if method in ("/loraplex.v1.Inference/Generate", "/loraplex.v1.Inference/Chat") and len(request) <= MAX_MESSAGE_BYTES:
                cls = ipb.GenerateRequest if method.endswith("/Generate") else ipb.ChatRequest
                with contextlib.suppress(Exception):  # unparsable: the replica answers INVALID_ARGUMENT
                    model = cls.FromString(request).model
                    record = self._snapshot.get((principal.tenant, model.removeprefix(self.served + ":")))
                    model_id = multiplex_id(record) if record is not None and model != self.served else ""
            call = {"method": method, "messages": messages, "metadata": metadata, "generation": self._generation}
            result = None
            for attempt in range(ATTEMPTS):
                stream = self.engine.options(stream=True, multiplexed_model_id=model_id).grpc.remote(call)
                try:
                    first = await stream.__anext__()
                    second = await stream.__anext__()
                except (RayActorError, ActorUnavailableError, StopAsyncIteration):
                    continue
                if isinstance(second, dict) and second.get("engine_dead") and attempt + 1 < ATTEMPTS:
                    stream.cancel()
                    await asyncio.sleep(RETRY_BACKOFF_S[attempt])
                    continue
                break
            else:
                raise ReplicaLost("no engine replica answered; retry")
            await context.send_initial_metadata(first["initial"])
            try:
                async for item in _prepend(second, stream):
                    if isinstance(item, bytes):
                        if kind == "unary_stream":
                            await context.write(item)
                        else:
                            result = item
                    elif "code" in item:
                        await context.abort(getattr(grpc.StatusCode, item["code"]), item["details"],
                                            tuple(item["trailing"]))
                    else:
                        context.set_trailing_metadata(tuple(item["trailing"]))
            except (RayActorError, ActorUnavailableError):
                raise ReplicaLost("the engine replica running this call died; retry it") from None
            finally:
                stream.cancel()
            if method in _GRPC_WRITES:
                await self._after_write()
            return result


async def _prepend(first, stream) -> AsyncIterator:
    yield first
    async for item in stream:
        yield item


class _GrpcForward(grpc.GenericRpcHandler):
    """Every loraplex.v1 method, forwarded (raw bytes both ways: the replica parses them)."""

    def __init__(self, ingress: LoraplexIngress):
        self.ingress = ingress

    def service(self, details):
        kind = GRPC_METHODS.get(details.method)
        if kind is None:
            return None

        async def handle(request, context):
            return await self.ingress.forward_grpc(details.method, kind, request, context)

        return getattr(grpc, f"{kind}_rpc_method_handler")(handle)


async def _start_grpc_front(ingress: LoraplexIngress, host: str, port: int):
    """The cluster's gRPC front: loraplex.v1 forwarded, health (SERVING while the ingress is
    up; each replica's engine is Ray's to watch) and reflection."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from server.api.grpc.errors import ErrorInterceptor
    from server.api.grpc.server import SERVER_OPTIONS, SERVICES

    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[*SERVER_OPTIONS, ("grpc.so_reuseport", 1)],
                             maximum_concurrent_rpcs=ingress.settings.grpc_max_concurrent_rpcs)
    server.add_generic_rpc_handlers((_GrpcForward(ingress),))
    checker = health.aio.HealthServicer()
    for name in ("", *SERVICES):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logger.info("gRPC front on %s:%d", host, port)
    return server


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
        health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + 15)
    ingress = serve.deployment(serve.ingress()(LoraplexIngress), name="LoraplexIngress",
                               ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=1000)
    return ingress, engine


SECRETS = ("registry_url", "store_url", "rate_limit_url")
"""Settings that may hold credentials: replicas read them from their environment."""

UNSUPPORTED_ON_RAY = {
    "lora_modules": "upload adapters through the API",
    "grpc_ssl_certfile": "terminate TLS in front of the cluster",
    "metrics_port": "each replica's /metrics is on the HTTP front (admin key); Ray exports its own",
    "ssl_certfile": "terminate TLS in front of Ray's proxy",
}


def ray_args(args: dict[str, Any] | None) -> dict[str, Any]:
    """The application's args, checked: a setting Ray Serve cannot honour is an error when the
    args give it, and is turned off for every replica when only the environment does (the image
    sets LORAPLEX_METRICS_PORT for the single server; on Ray it must not stop the app)."""
    args = dict(args or {})
    from_env = Settings()
    for field, why in UNSUPPORTED_ON_RAY.items():
        if args.get(field):
            raise ValueError(f"--{field.replace('_', '-')} is not supported on Ray Serve: {why}")
        if getattr(from_env, field):
            logger.warning("LORAPLEX_%s from the environment is ignored on Ray Serve: %s", field.upper(), why)
            args[field] = Settings.model_fields[field].get_default(call_default_factory=True)
    return args


def build(args: dict[str, Any] | None = None, *, replicas: int | None = None):
    """The Serve application (``import_path: server.cluster.app:build``). ``args`` are
    ``python -m server``'s settings by their field names (``max_loras: 8``); each replica also
    reads its own LORAPLEX_* environment (secrets: the registry, store and Redis URLs)."""
    args = ray_args(args)
    settings = Settings(**args)  # a bad setting fails `serve run`, not every replica
    ingress, engine = deployments(settings, replicas=replicas)
    return ingress.bind(engine.bind(args), args)


def run(settings: Settings, replicas: int) -> None:
    """``python -m server --replicas N``: a local Ray cluster, N engine replicas, the HTTP front
    on --host/--port. SIGTERM or Ctrl-C stops the application (each replica drains for Ray's
    graceful shutdown timeout) and the local cluster."""
    import os
    import signal

    import ray

    args = settings.model_dump(mode="json", exclude_unset=True, exclude={"replicas", "config", *SECRETS})
    args.setdefault("data_dir", str(settings.data_dir))  # one data directory for every replica
    if "adapter_cache_bytes" not in args:
        from server.adapters import residency

        if not residency.gpus_on_host():  # every replica on this host's memory: each a share of it
            args["adapter_cache_bytes"] = max(settings.adapter_cache_bytes // replicas, 256 << 20)
        # on GPUs each replica sizes its own, by the GPUs it holds
    # Secrets reach the replicas through the environment the local cluster inherits, never
    # through the app's args, which Ray keeps in its GCS and shows on its dashboard.
    for field in SECRETS:
        if (value := getattr(settings, field)) is not None:
            os.environ[f"LORAPLEX_{field.upper()}"] = value
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
