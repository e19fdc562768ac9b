"""Dependencies shared by the HTTP routers."""

from __future__ import annotations

from fastapi import Header, Request

from server.service import Service
from server.tenants.store import Principal


def service(request: Request) -> Service:
    return request.app.state.service


def principal(request: Request, authorization: str | None = Header(None)) -> Principal:
    """Authenticate (and rate-limit) before the body is looked at: a bad key is a 401, whatever the body."""
    return request.app.state.service.authenticate(authorization)
