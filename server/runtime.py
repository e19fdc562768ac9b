"""Assemble the server from settings: base, registry, store, engine, service, fronts.

Start: resolve the base -> open the registry -> repair what a crash left
(``adapters.service.recover``) -> start vLLM -> serve HTTP (and gRPC) with two background
tasks: :func:`watch_engine`, and the adapter store's garbage collector.

**A dead engine is restarted in process.** vLLM's engine core runs in its own
process; if it dies (a fault in a step, the OOM killer), ``/health`` and
``/ready`` answer 503 and gRPC health NOT_SERVING at once, requests get 503
``engine_not_ready``, and :func:`watch_engine` starts a new engine with the same
settings (``loraplex_engine_restarts_total`` counts it). After
``--engine-restarts`` restarts the server exits with status 3 instead, for its
supervisor (systemd, Kubernetes) to restart it from scratch.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from contextlib import asynccontextmanager

from server.adapters.registry import AdapterRegistry
from server.adapters.residency import engine_max_cpu_loras
from server.adapters.service import recover
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.db import Database
from server.errors import LoraplexError
from server.metrics import Metrics, register_state, watch_loop
from server.service import Service
from server.tenants.store import TenantStore

logger = logging.getLogger(__name__)


def open_db(settings: Settings) -> Database:
    """The registry: --registry-url (PostgreSQL, shared by several servers), else SQLite in --data-dir."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Database(settings.registry_url) if settings.registry_url else Database.in_data_dir(settings.data_dir)


def open_store(settings: Settings):
    """The adapter store: --store-url (object storage, shared), else a directory in --data-dir."""
    if settings.store_url:
        from server.adapters.remote import RemoteStore

        return RemoteStore(settings.store_url, settings.data_dir / "adapters", cache_bytes=settings.blob_cache_bytes)
    return AdapterStore(settings.data_dir / "adapters")


def build(settings: Settings, *, engine=None, shared: bool = False) -> Service:
    """Everything but the network listeners. Starts the engine unless one is given. ``shared``:
    other servers use the same registry and store even if they are local (Ray Serve replicas on
    one host), so crash recovery leaves what is younger than the GC grace alone."""
    from transformers import AutoTokenizer

    from server.engine.vllm_engine import EngineOptions, VllmEngine
    from trainer.base import resolve

    base = resolve(settings.base)
    served = settings.served_name or (settings.base if settings.base == "smollm2-135m" else base.path.name)
    spec = BaseSpec.from_config(served, base.config, base.fingerprint)
    db = open_db(settings)
    registry, store = AdapterRegistry(db), open_store(settings)
    counts = recover(registry, store, grace_s=settings.adapter_gc_grace_s if shared or store.shared or db.shared else 0.0)
    if any(counts.values()):
        logger.warning("recovered from an unclean stop: %s", counts)
    logger.info("host tier: up to %d adapters in %.1f GiB (--max-cpu-loras, --adapter-cache-bytes)",
                settings.max_cpu_loras, settings.adapter_cache_bytes / (1 << 30))
    if engine is None:
        engine = VllmEngine(EngineOptions(
            model=str(base.path), served_name=served, quantization=settings.quantization, dtype=settings.dtype,
            max_loras=settings.max_loras, max_cpu_loras=engine_max_cpu_loras(settings.max_cpu_loras),
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_bytes=settings.kv_cache_bytes, enforce_eager=settings.enforce_eager, seed=settings.seed,
            kv_cache_dtype=settings.kv_cache_dtype, max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enable_prefix_caching=settings.enable_prefix_caching, tensor_parallel_size=settings.tensor_parallel_size,
            fully_sharded_loras=settings.fully_sharded_loras, lora_kernel_configs=settings.lora_kernel_configs,
            lora_kernel_launch=settings.lora_kernel_launch,
            extra=tuple(sorted(settings.engine_args.items()))))
        engine.start()
    tool_parser = None
    if settings.enable_auto_tool_choice:
        from server.engine.tool_parsers import ToolParsers

        tool_parser = ToolParsers(settings.tool_call_parser, engine.tokenizer)
    service = Service(settings, base=base, base_spec=spec, engine=engine,
                      tokenizer=AutoTokenizer.from_pretrained(base.path), tenants=TenantStore(db),
                      registry=registry, store=store,
                      metrics=Metrics(top_n=settings.metrics_top_adapters), tool_parser=tool_parser)
    register_state(service)
    return service


REGISTRY_POLL_S = 0.25


async def watch_registry(service: Service, *, poll_s: float = REGISTRY_POLL_S) -> None:
    """Pick up what other servers (and the CLI) write to a shared registry: new, replaced and
    deleted adapters, pins, tenants and revocations, within ``poll_s``."""
    failing = False
    while True:
        await asyncio.sleep(poll_s)
        try:
            await service.refresh()
            if failing:
                logger.warning("the registry answers again")
            failing = False
        except Exception:
            if not failing:  # once per outage, not every poll
                logger.exception("polling the registry failed; serving from the last snapshot")
            failing = True


ENGINE_GAVE_UP = 3
"""Exit status once the engine died more often than --engine-restarts allows."""


async def watch_engine(service: Service, give_up, *, poll_s: float = 1.0) -> None:
    """Restart a dead engine, or call ``give_up(ENGINE_GAVE_UP)`` when restarts run out."""
    restarts = 0
    while True:
        await asyncio.sleep(poll_s)
        if not service.engine.dead:
            continue
        logger.error("the vLLM engine died; every request now gets 503 until it is back")
        service.adapters.engine_lost()  # the new engine starts with no adapter loaded
        if restarts >= service.settings.engine_restarts:
            logger.error("the engine died %d times (--engine-restarts %d); exiting with status %d for the "
                         "supervisor", restarts + 1, service.settings.engine_restarts, ENGINE_GAVE_UP)
            give_up(ENGINE_GAVE_UP)
            return
        restarts += 1
        service.metrics.engine_restarts.inc()
        try:
            await asyncio.to_thread(service.engine.restart)
        except Exception:
            logger.exception("restarting the engine failed; exiting with status %d", ENGINE_GAVE_UP)
            give_up(ENGINE_GAVE_UP)
            return
        logger.warning("engine restarted (%d of %d restarts allowed)", restarts, service.settings.engine_restarts)


async def serve(settings: Settings) -> None:
    """Run HTTP (and gRPC, and the metrics listener, when their ports are set) on one engine.

    SIGTERM (or SIGINT) drains: ``/ready`` and gRPC health say no at once, new requests get 503,
    the requests in flight on both fronts run on for up to ``--shutdown-grace-s`` and are then
    ended with a final error; then the listeners close and the engine stops. A second signal
    stops at once."""
    import uvicorn

    from server.api.http.app import create_app
    from server.api.http.metrics import create_metrics_app

    service = build(settings)
    loop = asyncio.get_running_loop()
    grpc_server = None
    exit_code = 0
    draining: asyncio.Task | None = None

    async def drain() -> None:
        service.inference.start_draining()
        steps = [service.inference.drain(settings.shutdown_grace_s)]
        if grpc_server is not None:  # NOT_SERVING and refusing new calls at once, like HTTP
            steps.append(grpc_server.stop(settings.shutdown_grace_s + 30))  # a backstop: the drain ends them first
        await asyncio.gather(*steps)
        for server in servers:
            server.should_exit = True

    def on_signal() -> None:
        nonlocal draining
        if draining is None:
            logger.warning("signal received: draining for up to %.0f s (a second signal stops at once)",
                           settings.shutdown_grace_s)
            draining = loop.create_task(drain())

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if draining is None and not self.should_exit:  # the first signal drains
                loop.call_soon_threadsafe(on_signal)
            else:
                for server in servers:
                    server.force_exit = server.should_exit = True

    class Quiet(Server):
        """A second listener: the first one owns the signal handlers."""

        @contextlib.contextmanager
        def capture_signals(self):
            yield

    def give_up(code: int) -> None:
        nonlocal exit_code
        exit_code = code
        for server in servers:
            server.should_exit = True

    @asynccontextmanager
    async def lifespan(app):
        # Shut the engine down here, not after serve() returns, so that it happens whatever
        # ends the server, before the process exits and orphans vLLM's engine-core processes.
        tasks = [asyncio.create_task(watch_engine(service, give_up)), asyncio.create_task(watch_loop()),
                 asyncio.create_task(watch_registry(service)),
                 asyncio.create_task(service.adapters.gc_forever())]
        try:
            if settings.lora_modules:  # before the first request: /ready says 200 only after this
                try:
                    await service.adapters.register_modules(settings.lora_modules, settings.lora_modules_tenant)
                except LoraplexError as e:
                    logger.error("--lora-modules: %s%s", f"{e.field}: " if e.field else "", e.message)
                    give_up(2)
            # What starting the engine and the app made lives as long as the process: kept out of the
            # collector's full passes, which otherwise walk it on the loop, as vLLM's API server does.
            gc.collect()
            gc.freeze()
            yield
        finally:
            for t in tasks:
                t.cancel()
            if grpc_server is not None:
                await grpc_server.stop(0)
            service.engine.shutdown()

    tls = {"ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}
    # Uvicorn's own graceful timeout only covers what the drain left: idle keep-alive connections.
    servers = [Server(uvicorn.Config(create_app(service, lifespan=lifespan), host=settings.host, port=settings.port,
                                     log_level="info", timeout_graceful_shutdown=5, **tls))]
    if settings.metrics_port is not None:
        servers.append(Quiet(uvicorn.Config(create_metrics_app(service), host=settings.metrics_host or settings.host,
                                            port=settings.metrics_port, log_level="warning", lifespan="off", **tls)))
    if settings.grpc_port is not None:
        from server.api.grpc.server import start_grpc

        grpc_server = await start_grpc(service, settings.host, settings.grpc_port,
                                       certfile=settings.grpc_ssl_certfile, keyfile=settings.grpc_ssl_keyfile)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        service.engine.shutdown()  # idempotent; covers a failed startup
    if exit_code:
        raise SystemExit(exit_code)
