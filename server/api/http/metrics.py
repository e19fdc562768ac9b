"""Prometheus exposition, and the listener that serves it without a key.

``/metrics`` labels series by tenant and adapter, so on the API port it is an
admin's (``Authorization: Bearer <admin key>``; Prometheus sends one with
``authorization: {credentials_file: ...}`` in its scrape config). For a
Prometheus on a private network, ``--metrics-port`` opens a second listener that
serves only ``/metrics``, without a key: bind it (``--metrics-host``) where only
the operator's network reaches.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from server.metrics import EXPOSITION


async def exposition() -> Response:
    """The registry's text, made in a worker thread: with a few hundred tenants and adapters it is
    50-250 ms of Python, which on the loop would hold every tenant's request (and the process
    tree's RSS is read from /proc)."""
    return Response(await asyncio.to_thread(generate_latest, EXPOSITION), media_type=CONTENT_TYPE_LATEST)


def create_metrics_app(service) -> Starlette:
    """The --metrics-port listener: /metrics and nothing else."""

    async def metrics(request):
        return await exposition()

    return Starlette(routes=[Route("/metrics", metrics)])
