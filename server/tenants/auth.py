"""Bearer-key authentication, without a database read on the hot path.

Every request carries ``Authorization: Bearer lpx_...``. The key's sha256 is
looked up in an in-memory snapshot of every live tenant, reloaded (one query)
when the registry's shared generation moves (``server/db.py``): a revoke, a new
tenant or new quotas, made through this server, another server sharing the
registry, or the CLI, takes effect on the next request after this server sees
the change (at once for its own writes; within the registry poll, 0.25 s, for
the others'). A flood of bad keys costs a dict lookup each.

Looking a hash up in a dict is not a constant-time compare, but what timing
could leak is the prefix of a sha256 digest, which says nothing about the key.
"""

from __future__ import annotations

import threading

from server.errors import Unauthenticated
from server.tenants.store import Principal, TenantStore, hash_key

MISSING = "missing Authorization: Bearer <key> header"
INVALID = "invalid API key"


class Authenticator:
    def __init__(self, store: TenantStore):
        self._store = store
        self._lock = threading.Lock()
        self._principals: dict[str, Principal] = {}
        self._generation: int | None = None

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
        principal = self._snapshot().get(hash_key(key))
        if principal is None:
            raise Unauthenticated(INVALID)
        return principal

    @property
    def stale(self) -> bool:
        """Whether the tenant store has moved past the loaded principals."""
        return self._store.generation != self._generation

    def reload(self) -> None:
        """Load the principals (blocking: the server calls it in a thread, before requests that
        would find them stale)."""
        generation = self._store.generation  # read before the load: a write after it reloads again
        principals = self._store.principals()
        with self._lock:
            if self._generation is None or generation >= self._generation:
                self._principals, self._generation = principals, generation

    def _snapshot(self) -> dict[str, Principal]:
        if self.stale:  # only callers outside the server (the server reloads first, off its loop)
            self.reload()
        return self._principals

    def invalidate(self) -> None:
        """Reload on the next request (the store's writes already cause that)."""
        with self._lock:
            self._generation = None
