"""Per-tenant limits: a request rate (a token bucket), and what may be in flight at once.

A bucket holds up to ``requests_per_minute`` tokens and refills at
``requests_per_minute / 60`` per second; each request takes one. So a tenant
may burst a minute's worth at once and then sustain its rate, and a refused
request learns how long until the next token (``Retry-After``). Admins are not
limited.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import ConcurrencyExceeded, QuotaExceeded, RateLimited
from server.tenants.store import Principal

logger = logging.getLogger(__name__)


@dataclass
class _Bucket:
    capacity: float
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}

    async def check(self, principal: Principal) -> None:
        """Take one token from the tenant's bucket, or raise :class:`RateLimited` with ``retry_after`` >= 1 s."""
        self.take(principal)

    def take(self, principal: Principal) -> None:
        if principal.is_admin:
            return
        rpm = principal.quotas.requests_per_minute
        per_second = rpm / 60.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(principal.tenant)
            if bucket is None:
                bucket = self._buckets[principal.tenant] = _Bucket(rpm, rpm, now)
            elif bucket.capacity != rpm:  # quota changed: keep what is left, within the new size
                bucket.capacity, bucket.tokens = rpm, min(bucket.tokens, rpm)
            bucket.tokens = min(bucket.capacity, bucket.tokens + (now - bucket.updated) * per_second)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = float(max(1, math.ceil((1.0 - bucket.tokens) / per_second)))
        raise RateLimited(f"tenant {principal.tenant!r} is over its limit of {rpm} requests per minute; "
                          f"retry in {wait:.0f} s", retry_after=wait)

    def forget(self, tenant: str) -> None:
        """Drop a tenant's bucket (after revoking it, say); its next request starts full."""
        with self._lock:
            self._buckets.pop(tenant, None)


class SharedRateLimiter:
    """Requests per minute counted in Redis (``--rate-limit-url redis://...``), so a tenant's limit
    holds across every server: a moving window of one minute per tenant, through the ``limits``
    library. Redis that does not answer lets requests through (logged once per outage): the
    limit is a fairness guard, and serving comes first."""

    def __init__(self, url: str):
        from limits.storage import storage_from_string
        from limits.aio.strategies import MovingWindowRateLimiter

        self.url = url
        self._storage = storage_from_string(url if url.startswith("async+") else f"async+{url}")
        self._strategy = MovingWindowRateLimiter(self._storage)
        self._items: dict[int, object] = {}
        self._failing = False

    async def check(self, principal: Principal) -> None:
        if principal.is_admin:
            return
        from limits import RateLimitItemPerMinute

        rpm = principal.quotas.requests_per_minute
        item = self._items.get(rpm) or self._items.setdefault(rpm, RateLimitItemPerMinute(rpm))
        try:
            allowed = await self._strategy.hit(item, "loraplex", principal.tenant)
            if not allowed:
                stats = await self._strategy.get_window_stats(item, "loraplex", principal.tenant)
            self._failing = False
        except Exception:
            if not self._failing:
                logger.exception("the rate-limit store %s does not answer; requests go through unlimited", self.url)
            self._failing = True
            return
        if not allowed:
            wait = float(max(1, math.ceil(stats.reset_time - time.time())))
            raise RateLimited(f"tenant {principal.tenant!r} is over its limit of {rpm} requests per minute; "
                              f"retry in {wait:.0f} s", retry_after=wait)


class Lease:
    """One admitted request's share of its tenant's in-flight limits; :meth:`release` is idempotent."""

    __slots__ = ("_limiter", "_tenant", "requests", "tokens")

    def __init__(self, limiter: InFlightLimiter | None, tenant: str, requests: int, tokens: int):
        self._limiter, self._tenant, self.requests, self.tokens = limiter, tenant, requests, tokens

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter._release(self._tenant, self.requests, self.tokens)
            self._limiter = None


class InFlightLimiter:
    """Per-tenant limits on what runs at once: engine sequences (each prompt of a request is one),
    and tokens they may still generate (``max_tokens`` x ``n`` per prompt, counted when admitted).
    A tenant at either limit gets a 429 with ``Retry-After`` instead of queueing in the shared
    engine ahead of everyone else (``InferenceService.check_prompt_count`` refuses a request with
    more prompts than the tenant may run at once, before this). Admins are not limited. Touched only from the event loop."""

    def __init__(self) -> None:
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def admit(self, principal: Principal, tokens: int, requests: int = 1) -> Lease:
        if principal.is_admin:
            return Lease(None, principal.tenant, 0, 0)
        q, tenant = principal.quotas, principal.tenant
        running, held = self._requests.get(tenant, 0), self._tokens.get(tenant, 0)
        if running + requests > q.max_concurrent_requests:
            raise ConcurrencyExceeded(f"tenant {tenant!r} already has {running} requests in flight, its limit is "
                                      f"{q.max_concurrent_requests}"
                                      f"{'' if requests == 1 else f' (this one runs {requests} prompts)'}; "
                                      "retry when one finishes")
        if tokens > q.max_inflight_tokens:
            raise QuotaExceeded(f"this request may generate {tokens} tokens (max_tokens x n x prompts), more than "
                                f"tenant {tenant!r}'s limit of {q.max_inflight_tokens} tokens in flight; lower "
                                "max_tokens or n", field="max_tokens")
        if held + tokens > q.max_inflight_tokens:
            raise ConcurrencyExceeded(f"tenant {tenant!r} has {held} tokens in flight (max_tokens x n of its running "
                                      f"requests); this one's {tokens} would pass its limit of "
                                      f"{q.max_inflight_tokens}; retry when one finishes", field="max_tokens")
        self._requests[tenant] = running + requests
        self._tokens[tenant] = held + tokens
        return Lease(self, tenant, requests, tokens)

    def in_flight(self, tenant: str) -> tuple[int, int]:
        """(requests, tokens) the tenant has in flight."""
        return self._requests.get(tenant, 0), self._tokens.get(tenant, 0)

    def _release(self, tenant: str, requests: int, tokens: int) -> None:
        self._requests[tenant] -= requests
        self._tokens[tenant] -= tokens
        if not self._requests[tenant]:
            del self._requests[tenant], self._tokens[tenant]
