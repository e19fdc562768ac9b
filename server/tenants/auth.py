"""Bearer-key authentication, without a database read on the hot path.

Every request carries ``Authorization: Bearer lpx_...``. The key's sha256 is
looked up in an in-memory map of live principals, filled on first use and
dropped whenever this process changes the tenant table
(``TenantStore.generation``), so a revoke through the server stops the key on
the very next request. Entries also expire after ``ttl`` seconds (default 1):
a revoke made by another process (``python -m server tenants revoke``) takes
effect within that time. Only keys that checked out
are cached: a flood of bad keys can't grow the map.

Looking a hash up in a dict is not a constant-time compare, but what timing
could leak is the prefix of a sha256 digest, which says nothing about the key.
"""

from __future__ import annotations

import threading
import time

from server.errors import Unauthenticated
from server.tenants.store import Principal, TenantStore, hash_key

MISSING = "missing Authorization: Bearer <key> header"
INVALID = "invalid API key"


class Authenticator:
    def __init__(self, store: TenantStore, *, ttl: float = 1.0, clock=time.monotonic):
        self._store = store
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._generation = store.generation

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization`` header value, or :class:`Unauthenticated`."""
        if not authorization or not authorization.strip():
            raise Unauthenticated(MISSING)
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthenticated(f"unsupported Authorization scheme {scheme!r}; send 'Authorization: Bearer <key>'")
        key = key.strip()
        if not key:
            raise Unauthenticated(MISSING)
        digest = hash_key(key)
        with self._lock:
            if self._generation != self._store.generation:
                self._cache.clear()
                self._generation = self._store.generation
            hit = self._cache.get(digest)
        now = self._clock()
        if hit is not None and hit[1] > now:
            return hit[0]
        generation = self._store.generation  # read before the lookup: a write after it clears what we add
        principal = self._store.principal_for(digest)
        if principal is None:
            raise Unauthenticated(INVALID)
        with self._lock:
            if self._generation == generation:
                self._cache[digest] = (principal, now + self._ttl)
        return principal

    def invalidate(self) -> None:
        """Forget every cached principal (the store's writes already do this)."""
        with self._lock:
            self._cache.clear()
