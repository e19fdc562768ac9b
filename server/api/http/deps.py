"""Dependencies shared by the HTTP routers."""

from __future__ import annotations

from fastapi import Header, Request

from server.service import Service
from server.tenants.store import Principal


# Both are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in
# its thread pool, which cost every request two thread hand-offs (see
# benchmarks/results/cpu/hotpath.md). Neither blocks: authentication is an
# in-memory lookup, with one short SQLite read per key per second (WAL: readers
# never wait for writers), as the registry snapshot refresh already does on the
# event loop.


async def service(request: Request) -> Service:
    return request.app.state.service


async def principal(request: Request, authorization: str | None = Header(None)) -> Principal:
    """Authenticate (and rate-limit) before the body is looked at: a bad key is a 401, whatever the body."""
    return request.app.state.service.authenticate(authorization)
