"""Service errors -> gRPC status codes, in one table, applied by one interceptor.

Servicers let the service's typed errors propagate; :class:`ErrorInterceptor`
wraps every ``loraplex.v1`` method and turns a :class:`LoraplexError` into
an aborted call. The details string is ``"<field>: <message>"`` when the error
names a field, and trailing metadata carries what a client may branch on:

- ``loraplex-field``: the request field at fault (``max_tokens``, ``model``);
- ``loraplex-code``: the error's code (``quota_exceeded``, ``model_not_found``),
  the same string the HTTP API puts in ``error.code``;
- ``retry-after``: whole seconds, when waiting helps (rate limits).
"""

from __future__ import annotations

import logging
import math

import grpc

from server import errors as e
from server.adapters.residency import AdapterCacheFull

logger = logging.getLogger(__name__)

CODES: dict[type[e.LoraplexError], grpc.StatusCode] = {
    e.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    e.AdapterRejected: grpc.StatusCode.INVALID_ARGUMENT,
    e.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    e.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    e.NotFound: grpc.StatusCode.NOT_FOUND,
    e.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    e.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    e.RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    e.EngineNotReady: grpc.StatusCode.UNAVAILABLE,
    e.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    AdapterCacheFull: grpc.StatusCode.UNAVAILABLE,
    e.AdapterLoadFailed: grpc.StatusCode.INTERNAL,
}


def code_of(exc: e.LoraplexError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def details_of(exc: e.LoraplexError) -> str:
    return f"{exc.field}: {exc.message}" if exc.field else exc.message


def trailers_of(exc: e.LoraplexError) -> tuple[tuple[str, str], ...]:
    out = [("loraplex-code", exc.code)]
    if exc.field:
        out.append(("loraplex-field", exc.field))
    if exc.retry_after is not None:
        out.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    return tuple(out)


async def abort(context: grpc.aio.ServicerContext, exc: e.LoraplexError) -> None:
    await context.abort(code_of(exc), details_of(exc), trailing_metadata=trailers_of(exc))


def _mapped(behavior):
    async def call(request, context):
        try:
            return await behavior(request, context)
        except e.LoraplexError as exc:
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:  # a bug, not the client's doing: log it, say nothing about internals
            logger.exception("gRPC handler failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return call


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies :data:`CODES` to every ``loraplex.v1`` method (health and reflection pass through).

    The servicers' methods are coroutines -- streaming ones write with
    ``context.write`` -- so one wrapper fits all four call shapes.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/loraplex.v1."):
            return handler
        kind = (f"{'stream' if handler.request_streaming else 'unary'}_"
                f"{'stream' if handler.response_streaming else 'unary'}")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(_mapped(getattr(handler, kind)), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
