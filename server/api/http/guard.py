"""What every HTTP request passes before a route runs: the drain, the key, and a bounded body.

FastAPI reads a JSON body whole, and resolves a route's dependencies only after
that; Starlette reads for as long as the client sends. So the checks that must
come first live here, in an ASGI middleware in front of the app:

1. **Drain.** Once SIGTERM has started the drain, a new request gets 503
   ``server_shutting_down``; health, readiness and metrics still answer.
2. **The key.** Every path but the public ones (:data:`PUBLIC`) needs
   ``Authorization: Bearer <key>``, checked from the headers (and the tenant's
   request rate charged) before one byte of the body is read. The principal
   goes to the route in ``request.state.principal``.
3. **A bounded body.** A declared ``Content-Length`` over the cap is a 413 at
   once. A JSON body (at most ``--max-request-bytes``) is read here, whole,
   within ``--body-timeout-s``, then handed to the app. An upload (at most
   ``--max-upload-bytes``) streams through to its route, counted as it comes,
   and a pause of more than ``--body-timeout-s`` between chunks is a 408. So a
   client that claims 2 GiB and sends 1 MiB is answered within seconds, and
   one without a key is answered before it has sent anything.
"""

from __future__ import annotations

import asyncio
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.http.errors import error_response
from server.errors import LoraplexError, PayloadTooLarge, RequestTimeout

PUBLIC = frozenset({"/health", "/ready", "/version", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                    "/redoc"})
"""Paths that answer without a key. /metrics checks its own (an admin key)."""
_UPLOAD = re.compile(r"^/v1/adapters(/[^/]+)?$")
_FORM_SLACK = 1 << 20
"""Multipart framing (boundaries, part headers, the name field) on top of the adapter's bytes."""


class _ClientGone(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        settings = self.service.settings
        try:
            if path in PUBLIC:
                return await self.app(scope, receive, send)
            # A request a Ray Serve ingress forwarded (server/cluster) had its rate charged there.
            charged = scope.get("extensions", {}).get("loraplex.charged", False)
            principal = await self.service.authenticate(_header(scope, b"authorization"), charge=not charged)
            scope.setdefault("state", {})["principal"] = principal
            upload = method in ("POST", "PUT") and _UPLOAD.match(path) is not None and \
                _header(scope, b"content-type", "").startswith("multipart/")
            cap = settings.max_upload_bytes + _FORM_SLACK if upload else settings.max_request_bytes
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > cap:
                raise PayloadTooLarge(_too_large(int(declared), cap, upload), field="body")
            if upload:
                receive = _Counted(receive, cap, settings.body_timeout_s)
            else:
                body = await _read_body(receive, cap, settings.body_timeout_s)
                receive = _replay(body, receive)
        except LoraplexError as exc:
            return await error_response(exc)(scope, _closed, send)
        except _ClientGone:
            return
        await self.app(scope, receive, send)


def _header(scope: Scope, name: bytes, default: str | None = None) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return default


def _too_large(size: int, cap: int, upload: bool) -> str:
    if upload:
        return (f"the request body is {size} bytes; an adapter upload is at most {cap - _FORM_SLACK} bytes "
                "(--max-upload-bytes)")
    return f"the request body is {size} bytes; a request is at most {cap} bytes (--max-request-bytes)"


async def _read_body(receive: Receive, cap: int, timeout_s: float) -> bytes:
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > cap:
                    raise PayloadTooLarge(_too_large(size, cap, False) + " or more", field="body")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout(f"the request body was not complete after {timeout_s:g} s (--body-timeout-s); "
                             f"{size} bytes arrived", field="body") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read above, then the client's own messages (a disconnect, during a stream)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Counted:
    """An upload's ``receive``: raises :class:`PayloadTooLarge` past the cap and
    :class:`RequestTimeout` after a pause of ``timeout_s``; the route's error handler answers."""

    def __init__(self, receive: Receive, cap: int, timeout_s: float):
        self._receive, self.cap, self.timeout_s, self.size = receive, cap, timeout_s, 0

    async def __call__(self) -> Message:
        try:
            message = await asyncio.wait_for(self._receive(), self.timeout_s)
        except TimeoutError:
            raise RequestTimeout(f"the upload stalled: no bytes for {self.timeout_s:g} s (--body-timeout-s) after "
                                 f"{self.size} bytes", field="body") from None
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.cap:
                raise PayloadTooLarge(_too_large(self.size, self.cap, True) + " or more", field="files")
        return message


async def _closed() -> Message:
    return {"type": "http.disconnect"}
