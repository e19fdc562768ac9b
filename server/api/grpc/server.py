"""Start the gRPC server on the running event loop: the two services, health and reflection.

``runtime.serve`` awaits :func:`start_grpc` inside uvicorn's loop when
``--grpc-port`` is set, so gRPC and HTTP share one process, one Service and
one engine. ``grpc.health.v1.Health`` reports SERVING for the whole server
(``""``) and for each loraplex service while the engine is ready, and
NOT_SERVING while it is dead and once the drain begins (SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.api.grpc.adapters import AdaptersServicer
from server.api.grpc.errors import ErrorInterceptor
from server.api.grpc.inference import InferenceServicer
from server.api.grpc.pb import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
from server.service import Service

logger = logging.getLogger(__name__)

SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name)
HEALTH_POLL_S = 1.0
MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default; upload chunks must stay under it
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A connection that carries no call for 5 minutes is closed (GOAWAY), and a peer that stops
    # answering keepalive pings is dropped after 20 s: neither holds a socket forever.
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Clients may ping every 10 s, without a call in flight (grpc's own default would GOAWAY them).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A client sends at most one message (4 MiB) ahead of what a call has read. gRPC's default
    # grows each stream's window with the link (BDP probing): four uploads at once held 80-120 MiB
    # in the Ray ingress before it had read them, against 13-18 MiB with this window.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", MAX_MESSAGE_BYTES),
]
"""Every loraplex gRPC server's options: the single server's and the Ray ingress's."""


class GrpcServer:
    """The running server; ``port`` is the bound one (``--grpc-port 0`` picks a free port)."""

    def __init__(self, server: grpc.aio.Server, port: int, service: Service):
        self.server, self.port, self.service = server, port, service
        self.health = health.aio.HealthServicer()
        self._watch: asyncio.Task | None = None
        self._stopping: asyncio.Future | None = None

    async def start(self) -> None:
        await self._set_health(self.service.engine.ready)
        await self.server.start()
        self._watch = asyncio.create_task(self._track_engine())

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def _track_engine(self) -> None:
        serving = self.service.engine.ready
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            if self.service.engine.ready != serving:
                serving = self.service.engine.ready
                await self._set_health(serving)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING and refusing new calls at once, then let calls in flight finish for
        ``grace`` seconds. A second call waits for the first."""
        if self._stopping is None:
            if self._watch is not None:
                self._watch.cancel()
            await self.health.enter_graceful_shutdown()
            self._stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.shield(self._stopping)


def _credentials(certfile: Path, keyfile: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(keyfile.read_bytes(), certfile.read_bytes())])


async def start_grpc(service: Service, host: str, port: int, *, certfile: Path | None = None,
                     keyfile: Path | None = None) -> GrpcServer:
    """Listen on ``host:port``: TLS with ``certfile``/``keyfile`` (PEM), plaintext without. At most
    --grpc-max-concurrent-rpcs calls run at once; one more is RESOURCE_EXHAUSTED."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS,
                             maximum_concurrent_rpcs=service.settings.grpc_max_concurrent_rpcs)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(service), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(service), server)
    address = f"{host}:{port}"
    bound = (server.add_secure_port(address, _credentials(certfile, keyfile)) if certfile is not None
             else server.add_insecure_port(address))
    grpc_server = GrpcServer(server, bound, service)
    health_pb2_grpc.add_HealthServicer_to_server(grpc_server.health, server)
    reflection.enable_server_reflection((*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    await grpc_server.start()
    logger.info("gRPC serving %s on %s:%d (%s)", ", ".join(SERVICES), host, grpc_server.port,
                "TLS" if certfile is not None else "plaintext")
    return grpc_server
