"""Typed service errors. Fronts map them to HTTP + OpenAI error bodies and to gRPC
status codes in one place each; nothing decides a status by matching text."""

from __future__ import annotations

import reprlib


class LoraplexError(Exception):
    """Base of every error a client can cause. ``field`` names the request field at fault;
    ``retry_after`` (seconds) is set where waiting helps, and becomes ``Retry-After``."""

    type: str = "invalid_request_error"
    code: str = "bad_request"
    retry_after: float | None = None

    def __init__(self, message: str, *, field: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidArgument(LoraplexError):
    code = "invalid_argument"


_shown = reprlib.Repr()
_shown.maxlevel, _shown.maxstring, _shown.maxother = 2, 80, 80
_shown.maxlist = _shown.maxtuple = _shown.maxdict = _shown.maxset = 8


def require(field: str, ok: bool, rule: str, value) -> None:
    """Raise InvalidArgument naming ``field`` unless ``ok``. The message quotes ``value`` cut to a
    few items and characters, however large the client made it."""
    if not ok:
        raise InvalidArgument(f"must be {rule}, got {_shown.repr(value)}", field=field)


class UnsupportedParameter(InvalidArgument):
    """A request parameter loraplex does not honour: refused rather than silently ignored."""

    code = "unsupported_parameter"


class AdapterRejected(InvalidArgument):
    """An upload vLLM could not serve (compat rules, bad files, another base). Nothing was kept."""

    code = "adapter_rejected"


class NotFound(LoraplexError):
    """Unknown model or adapter -- and, with the same message, another tenant's adapter."""

    code = "model_not_found"


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class Conflict(LoraplexError):
    code = "conflict"


class Unauthenticated(LoraplexError):
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(LoraplexError):
    type = "permission_error"
    code = "permission_denied"


class RateLimited(LoraplexError):
    """Request rate or quota exceeded; retry after ``retry_after`` seconds (None: not by waiting)."""

    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    code = "quota_exceeded"


class ConcurrencyExceeded(RateLimited):
    """The tenant already has its limit of requests, or of tokens, in flight."""

    code = "concurrency_limit_exceeded"
    retry_after = 1.0


class EngineNotReady(LoraplexError):
    type = "server_error"
    code = "engine_not_ready"
    retry_after = 5.0


class ShuttingDown(EngineNotReady):
    """The server is draining (SIGTERM): new requests go elsewhere, and one still running past
    ``--shutdown-grace-s`` ends with this error."""

    code = "server_shutting_down"


class ReplicaLost(EngineNotReady):
    """Ray Serve: the engine replica running a request died under it (its in-flight requests end
    with this; a retry goes to another replica, and Ray starts a new one)."""

    code = "replica_lost"
    retry_after = 1.0


class StoreUnavailable(LoraplexError):
    """The shared adapter store (object storage) did not answer: what needs it -- a cold adapter
    not in the local cache, an upload -- waits; loaded and cached adapters keep serving."""

    type = "server_error"
    code = "store_unavailable"
    retry_after = 5.0


class StagingFull(StoreUnavailable):
    """The disk that stages uploads (and holds a SQLite registry) has no room for one more."""

    code = "insufficient_storage"
    retry_after = 30.0


class AdapterLoadFailed(LoraplexError):
    """vLLM could not load an adapter the server had accepted (its blob is damaged, or the
    installed vLLM refuses what an earlier one took). Only that adapter's requests fail."""

    type = "server_error"
    code = "adapter_load_failed"


class PayloadTooLarge(LoraplexError):
    """A request body or upload over its cap."""

    code = "payload_too_large"


class RequestTimeout(LoraplexError):
    """The client stopped sending its request body."""

    code = "request_timeout"
