"""Service errors -> HTTP status + OpenAI error body, in one table."""

from __future__ import annotations

import functools
import json
import logging
import math
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.adapters.residency import AdapterCacheFull
from server import errors as e

logger = logging.getLogger(__name__)

STATUS: dict[type[e.LoraplexError], int] = {
    e.InvalidArgument: 400,
    e.AdapterRejected: 400,
    e.Unauthenticated: 401,
    e.PermissionDenied: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.RateLimited: 429,
    e.QuotaExceeded: 429,
    e.PayloadTooLarge: 413,
    e.RequestTimeout: 408,
    e.EngineNotReady: 503,
    e.StoreUnavailable: 503,
    AdapterCacheFull: 503,
    e.AdapterLoadFailed: 500,
}


def status_of(exc: e.LoraplexError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: e.LoraplexError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, e.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body(exc.message, exc.type, exc.field, exc.code), status_code=status_of(exc), headers=headers)


_UNION_TAG = re.compile(r"(str|int|float|bool|none|(list|dict|tuple|literal|function-\w+|json-or-python)\[.*\])")
"""What pydantic puts in an error's location for the member of a union it tried: not a field."""


@functools.cache
def _model_names() -> frozenset[str]:
    from server.api.http import protocol

    return frozenset(k for k, v in vars(protocol).items() if isinstance(v, type) and issubclass(v, BaseModel))


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")
             and not (isinstance(p, str) and (_UNION_TAG.fullmatch(p) or p in _model_names()))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(e.LoraplexError)
    async def _service_error(request: Request, exc: e.LoraplexError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
        if first.get("type") == "json_invalid":
            return JSONResponse(body("the request body is not valid JSON", "invalid_request_error", None,
                                     "invalid_json"), status_code=400)
        param = _loc(tuple(first["loc"]))
        if first.get("type") == "extra_forbidden":  # a parameter loraplex does not know: refused, not ignored
            return JSONResponse(body(f"{param} is not a parameter loraplex supports (nothing is silently ignored; "
                                     "see the README's parameter table)", "invalid_request_error", param,
                                     "unsupported_parameter"), status_code=400)
        msg = "; ".join(f"{_loc(tuple(x['loc']))}: {x['msg']}" for x in errs[:5])
        return JSONResponse(body(msg, "invalid_request_error", param, "invalid_type"
                                 if "type" in first.get("type", "") else "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(body(str(exc.detail), "invalid_request_error", None, None), status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        logger.info("client went away during %s %s; nothing was kept", request.method, request.url.path)
        return JSONResponse(body("the client disconnected", "invalid_request_error", None, "client_disconnected"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not a client's mistake: OpenAI's body all the same, and the traceback in the log.
        logger.exception("unhandled error serving %s %s", request.method, request.url.path)
        return JSONResponse(body("the server hit an internal error; it is logged", "server_error", None,
                                 "internal_error"), status_code=500)

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError):
        return JSONResponse(body("the request body is not valid JSON", "invalid_request_error", None,
                                 "invalid_json"), status_code=400)
