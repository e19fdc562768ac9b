"""Dependencies shared by the HTTP routers.

Both are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its
thread pool, which cost every request two thread hand-offs (see
benchmarks/results/cpu/hotpath.md).
"""

from __future__ import annotations

from fastapi import Request

from server.service import Service
from server.tenants.store import Principal


async def service(request: Request) -> Service:
    return request.app.state.service


async def principal(request: Request) -> Principal:
    """The caller, authenticated (and rate-limited) by :mod:`server.api.http.guard` from the
    headers, before the body was read."""
    return request.state.principal
