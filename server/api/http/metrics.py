"""Prometheus exposition, and the listener that serves it without a key.

``/metrics`` labels series by tenant and adapter, so on the API port it is an
admin's (``Authorization: Bearer <admin key>``; Prometheus sends one with
``authorization: {credentials_file: ...}`` in its scrape config). For a
Prometheus on a private network, ``--metrics-port`` opens a second listener that
serves only ``/metrics``, without a key: bind it (``--metrics-host``) where only
the operator's network reaches.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from server.metrics import EXPOSITION


def exposition() -> Response:
    return Response(generate_latest(EXPOSITION), media_type=CONTENT_TYPE_LATEST)


def create_metrics_app(service) -> Starlette:
    """The --metrics-port listener: /metrics and nothing else."""

    async def metrics(request):
        return exposition()

    return Starlette(routes=[Route("/metrics", metrics)])
