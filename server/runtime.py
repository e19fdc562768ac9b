"""Assemble the server from settings: base, registry, store, engine, service, fronts."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import asynccontextmanager

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.adapters.upload import BaseSpec
from server.config import Settings
from server.db import Database
from server.metrics import Metrics, register_state
from server.service import Service
from server.tenants.store import TenantStore

logger = logging.getLogger(__name__)


def open_db(settings: Settings) -> Database:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Database.in_data_dir(settings.data_dir)


def build(settings: Settings, *, engine=None) -> Service:
    """Everything but the network listeners. Starts the engine unless one is given."""
    from transformers import AutoTokenizer

    from server.engine.vllm_engine import EngineOptions, VllmEngine
    from trainer.base import resolve

    base = resolve(settings.base)
    served = settings.served_name or (settings.base if settings.base == "smollm2-135m" else base.path.name)
    spec = BaseSpec.from_config(served, base.config, base.fingerprint)
    db = open_db(settings)
    if engine is None:
        engine = VllmEngine(EngineOptions(
            model=str(base.path), served_name=served, quantization=settings.quantization, dtype=settings.dtype,
            max_loras=settings.max_loras, max_cpu_loras=settings.max_cpu_loras, max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len, gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_bytes=settings.kv_cache_bytes, enforce_eager=settings.enforce_eager, seed=settings.seed))
        engine.start()
    service = Service(settings, base=base, base_spec=spec, engine=engine,
                      tokenizer=AutoTokenizer.from_pretrained(base.path), tenants=TenantStore(db),
                      registry=AdapterRegistry(db), store=AdapterStore(settings.data_dir / "adapters"),
                      metrics=Metrics(top_n=settings.metrics_top_adapters))
    register_state(service)
    return service


async def serve(settings: Settings, *, ready_callback=None) -> None:
    """Run HTTP (and gRPC, when --grpc-port is set) on one engine until SIGINT/SIGTERM."""
    import uvicorn

    from server.api.http.app import create_app

    service = build(settings)
    grpc_server = None

    @asynccontextmanager
    async def lifespan(app):
        # Shut the engine down here, not after serve() returns: uvicorn re-raises
        # SIGTERM/SIGINT once it has stopped, which would kill this process
        # before a `finally` ran and orphan vLLM's engine-core processes.
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            service.engine.shutdown()

    config = uvicorn.Config(create_app(service, lifespan=lifespan), host=settings.host, port=settings.port,
                            log_level="info", timeout_graceful_shutdown=10)
    http = uvicorn.Server(config)
    if settings.grpc_port is not None:
        from server.api.grpc.server import start_grpc

        grpc_server = await start_grpc(service, settings.host, settings.grpc_port)
    try:
        await http.serve()
    finally:
        service.engine.shutdown()  # idempotent; covers a failed startup


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
