"""Per-tenant request rate limits: one token bucket per tenant.

A bucket holds up to ``requests_per_minute`` tokens and refills at
``requests_per_minute / 60`` per second; each request takes one. So a tenant
may burst a minute's worth at once and then sustain its rate, and a refused
request learns how long until the next token (``Retry-After``). Admins are not
limited.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import RateLimited
from server.tenants.store import Principal


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

    def check(self, principal: Principal) -> None:
        """Take one token from the tenant's bucket, or raise :class:`RateLimited` with ``retry_after`` >= 1 s."""
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
