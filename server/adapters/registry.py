"""Which adapters exist: per tenant, by name, versioned, in the registry database.

A tenant's adapter ``name`` has one ACTIVE version, the one requests get.
Replacing it adds version n+1 and marks n RETIRED; a retired row stays until
the engine has drained requests still using it (:meth:`retired`, then
:meth:`forget`), so its blob is not garbage-collected under them.

The hot path must not query the database per request: :attr:`generation` (the
database's shared counter, see ``server/db.py``) goes up on every write, by this
server or another one sharing the registry, so a caller keeps :meth:`snapshot`
and refreshes it only when the generation moved (read ``generation`` *before*
taking the snapshot).

Lookups are always by (caller's tenant, name): another tenant's adapter is
indistinguishable from a missing one, down to the error message.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace as _replace
from enum import StrEnum
from typing import TYPE_CHECKING

from server import failpoints
from server.db import Conn, Database, Row
from server.errors import Conflict, InvalidArgument, NotFound, QuotaExceeded, TenantNotFound

if TYPE_CHECKING:
    from server.adapters.upload import AdapterInfo

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterStatus(StrEnum):
    ACTIVE = "active"
    """The version requests for the name are served with."""
    RETIRED = "retired"
    """Replaced by a newer version; kept until in-flight requests drain."""


@dataclass(frozen=True)
class AdapterRecord:
    tenant: str
    name: str
    version: int
    digest: str
    rank: int
    size_bytes: int
    target_modules: tuple[str, ...]
    base_fingerprint: str | None
    pinned: bool
    """Kept resident on the GPU, never evicted."""
    created_at: float
    status: AdapterStatus
    retired_at: float | None = None

    @property
    def key(self) -> str:
        """Unique across tenants and versions: ``tenant/name@version``."""
        return f"{self.tenant}/{self.name}@{self.version}"


def validate_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(f"adapter name {name!r} is invalid: use 1-128 characters of A-Z, a-z, 0-9, '.', '_' "
                              "or '-', starting with a letter or digit, without '..'", field="name")


def not_found(name: str) -> NotFound:
    """The one message for a missing adapter and for another tenant's (OpenAI's wording)."""
    return NotFound(f"The model `{name}` does not exist.", field="model")


class AdapterRegistry:
    def __init__(self, db: Database):
        self._db = db

    @property
    def generation(self) -> int:
        return self._db.generation

    def poll(self) -> int:
        """Read the shared generation from the database (blocking: call it off the event loop)."""
        return self._db.poll()

    def add(self, tenant: str, name: str, digest: str, info: AdapterInfo, *, max_adapters: int) -> AdapterRecord:
        """Register a new adapter name for ``tenant``: version 1, or one past the last version a
        deleted adapter of the same name had."""
        validate_name(name)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
                raise TenantNotFound(f"tenant {tenant!r} does not exist", field="tenant")
            conn.lock_tenant(tenant)  # the count below holds against uploads through every server
            if _active(conn, tenant, name) is not None:
                raise Conflict(f"adapter `{name}` already exists; replace it to upload a new version", field="name")
            count = conn.execute("SELECT COUNT(*) FROM adapters WHERE tenant = ? AND status = 'active'",
                                 (tenant,)).fetchone()[0]
            if count >= max_adapters:
                raise QuotaExceeded(f"tenant {tenant!r} already has {count} adapters, its limit is {max_adapters}; "
                                    "delete one first", field="name")
            record = _insert(conn, tenant, name, _next_version(conn, tenant, name), digest, info, pinned=False)
            failpoints.hit("registry.before_commit")
            return record

    def replace(self, tenant: str, name: str, digest: str, info: AdapterInfo) -> tuple[AdapterRecord, AdapterRecord]:
        """Make a new version ACTIVE and the current one RETIRED; returns ``(new, old)``. Pinning carries over."""
        with self._write() as conn:
            conn.lock_tenant(tenant)  # one writer per tenant at a time, across servers
            old = _active(conn, tenant, name)
            if old is None:
                raise not_found(name)
            retired_at = time.time()
            conn.execute("UPDATE adapters SET status = 'retired', retired_at = ? WHERE tenant = ? AND name = ? "
                         "AND version = ?", (retired_at, tenant, name, old.version))
            new = _insert(conn, tenant, name, _next_version(conn, tenant, name), digest, info, pinned=old.pinned)
            failpoints.hit("registry.before_commit")
        return new, _replace(old, status=AdapterStatus.RETIRED, retired_at=retired_at)

    def get(self, tenant: str, name: str) -> AdapterRecord:
        """The ACTIVE version of ``tenant``'s adapter ``name``."""
        row = self._db.query_one("SELECT * FROM adapters WHERE tenant = ? AND name = ? AND status = 'active'",
                                 (tenant, name))
        if row is None:
            raise not_found(name)
        return _record(row)

    def find(self, tenant: str, name: str) -> AdapterRecord | None:
        """The ACTIVE version of ``tenant``'s adapter ``name``, or None (one indexed row, not a list)."""
        row = self._db.query_one("SELECT * FROM adapters WHERE tenant = ? AND name = ? AND status = 'active'",
                                 (tenant, name))
        return None if row is None else _record(row)

    def count(self, tenant: str) -> int:
        """How many ACTIVE adapters ``tenant`` has."""
        row = self._db.query_one("SELECT COUNT(*) AS n FROM adapters WHERE tenant = ? AND status = 'active'",
                                 (tenant,))
        return row["n"]

    def list(self, tenant: str) -> list[AdapterRecord]:
        """``tenant``'s ACTIVE adapters, by name."""
        rows = self._db.query("SELECT * FROM adapters WHERE tenant = ? AND status = 'active' ORDER BY name", (tenant,))
        return [_record(r) for r in rows]

    def list_all(self) -> list[AdapterRecord]:
        """Every tenant's ACTIVE adapters, by tenant then name."""
        rows = self._db.query("SELECT * FROM adapters WHERE status = 'active' ORDER BY tenant, name")
        return [_record(r) for r in rows]

    def delete(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Remove every version of an adapter; returns them so the engine can unload each."""
        with self._write() as conn:
            conn.lock_tenant(tenant)  # one writer per tenant at a time, across servers
            records = [_record(r) for r in conn.execute(
                "SELECT * FROM adapters WHERE tenant = ? AND name = ? ORDER BY version", (tenant, name))]
            if not any(r.status is AdapterStatus.ACTIVE for r in records):
                raise not_found(name)
            conn.execute("DELETE FROM adapters WHERE tenant = ? AND name = ?", (tenant, name))
        return records

    def set_pinned(self, tenant: str, name: str, pinned: bool, *, max_pinned: int | None = None,
                   room: tuple[float, float] | None = None) -> AdapterRecord:
        """Pin or unpin. Pinning past ``max_pinned`` of the tenant's adapters, or past ``room``
        (adapters, bytes) for every tenant's pins together, is a :class:`QuotaExceeded`. The
        tenant's count is taken under its lock, so it holds across servers; the total may pass by
        a pin per server that pins at the same moment."""
        with self._write() as conn:
            conn.lock_tenant(tenant)  # one writer per tenant at a time, across servers
            if pinned:
                _check_pin(conn, tenant, name, max_pinned, room)
            cur = conn.execute("UPDATE adapters SET pinned = ? WHERE tenant = ? AND name = ? AND status = 'active'",
                               (int(pinned), tenant, name))
            if cur.rowcount == 0:
                raise not_found(name)
            return _active(conn, tenant, name)

    def check_pin(self, tenant: str, name: str, *, max_pinned: int | None = None,
                  room: tuple[float, float] | None = None) -> None:
        """What :meth:`set_pinned` would refuse, without writing (before the adapter is loaded)."""
        with self._db.transaction(write=False) as conn:
            _check_pin(conn, tenant, name, max_pinned, room)

    def retired(self) -> list[AdapterRecord]:
        """Replaced versions not yet forgotten, oldest first."""
        rows = self._db.query("SELECT * FROM adapters WHERE status = 'retired' ORDER BY created_at, tenant, name")
        return [_record(r) for r in rows]

    def forget(self, record: AdapterRecord) -> None:
        """Drop a RETIRED row once nothing uses it any more (its blob becomes garbage if unshared)."""
        with self._write() as conn:
            conn.execute("DELETE FROM adapters WHERE tenant = ? AND name = ? AND version = ? AND status = 'retired'",
                         (record.tenant, record.name, record.version))

    def live_digests(self) -> set[str]:
        """Blobs some row (ACTIVE or RETIRED) still refers to: everything else in the store is garbage."""
        return {r[0] for r in self._db.query("SELECT DISTINCT digest FROM adapters")}

    def snapshot(self) -> dict[tuple[str, str], AdapterRecord]:
        """Every ACTIVE adapter by (tenant, name), for a cache refreshed when :attr:`generation` moves."""
        return {(r.tenant, r.name): r for r in self.list_all()}

    def records(self) -> list[AdapterRecord]:
        """Every row, ACTIVE and RETIRED, by tenant, name and version."""
        return [_record(r) for r in self._db.query("SELECT * FROM adapters ORDER BY tenant, name, version")]

    def drop(self, record: AdapterRecord) -> None:
        """Remove one version's row, whatever its status (crash recovery: its blob is gone)."""
        with self._write() as conn:
            conn.execute("DELETE FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
                         (record.tenant, record.name, record.version))

    def restore(self, new: AdapterRecord, old: AdapterRecord) -> None:
        """Undo :meth:`replace`: drop ``new`` and make ``old`` ACTIVE again."""
        with self._write() as conn:
            conn.execute("DELETE FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
                         (new.tenant, new.name, new.version))
            conn.execute("UPDATE adapters SET status = 'active', retired_at = NULL WHERE tenant = ? AND name = ? "
                         "AND version = ?", (old.tenant, old.name, old.version))

    @contextmanager
    def _write(self) -> Iterator[Conn]:
        with self._db.transaction() as conn:  # bumps the shared generation when it commits
            yield conn


def _active(conn: Conn, tenant: str, name: str) -> AdapterRecord | None:
    row = conn.execute("SELECT * FROM adapters WHERE tenant = ? AND name = ? AND status = 'active'",
                       (tenant, name)).fetchone()
    return None if row is None else _record(row)


def _next_version(conn: Conn, tenant: str, name: str) -> int:
    """One more than any version this name ever had, including deleted ones."""
    row = conn.execute("SELECT last_version FROM adapter_versions WHERE tenant = ? AND name = ?",
                       (tenant, name)).fetchone()
    highest = conn.execute("SELECT MAX(version) FROM adapters WHERE tenant = ? AND name = ?",
                           (tenant, name)).fetchone()[0]
    version = max(row[0] if row else 0, highest or 0) + 1
    conn.execute("INSERT INTO adapter_versions (tenant, name, last_version) VALUES (?, ?, ?) "
                 "ON CONFLICT (tenant, name) DO UPDATE SET last_version = excluded.last_version",
                 (tenant, name, version))
    return version


def _insert(conn: Conn, tenant: str, name: str, version: int, digest: str, info: AdapterInfo,
            *, pinned: bool) -> AdapterRecord:
    record = AdapterRecord(tenant, name, version, digest, info.rank, info.size_bytes, tuple(info.target_modules),
                           info.base_fingerprint, pinned, time.time(), AdapterStatus.ACTIVE)
    conn.execute(
        "INSERT INTO adapters (tenant, name, version, digest, rank, size_bytes, target_modules, base_fingerprint,"
        " pinned, created_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (tenant, name, version, digest, record.rank, record.size_bytes, json.dumps(list(record.target_modules)),
         record.base_fingerprint, int(pinned), record.created_at, record.status.value))
    return record


def _record(row: Row) -> AdapterRecord:
    return AdapterRecord(
        row["tenant"], row["name"], row["version"], row["digest"], row["rank"], row["size_bytes"],
        tuple(json.loads(row["target_modules"])), row["base_fingerprint"], bool(row["pinned"]),
        row["created_at"], AdapterStatus(row["status"]), row.get("retired_at"),
    )


def _check_pin(conn: Conn, tenant: str, name: str, max_pinned: int | None, room: tuple[float, float] | None) -> None:
    """Pinning ``tenant``'s ``name`` past ``max_pinned`` of its adapters, or past ``room``
    (adapters, bytes) for every tenant's pins together, is a :class:`QuotaExceeded` on ``pin``."""
    if max_pinned is not None:
        n = conn.execute("SELECT COUNT(*) FROM adapters WHERE tenant = ? AND status = 'active' "
                         "AND pinned = 1 AND name <> ?", (tenant, name)).fetchone()[0]
        if n >= max_pinned:
            raise QuotaExceeded(f"tenant {tenant!r} has {n} pinned adapters, its limit is {max_pinned} "
                                "(--max-pins-per-tenant); unpin one first", field="pin")
    if room is not None:
        row = conn.execute("SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapters WHERE status = 'active' "
                           "AND pinned = 1 AND NOT (tenant = ? AND name = ?)", (tenant, name)).fetchone()
        count, size = row[0], row[1]
        mine = conn.execute("SELECT size_bytes FROM adapters WHERE tenant = ? AND name = ? AND status = 'active'",
                            (tenant, name)).fetchone()
        if mine is not None and (count + 1 > room[0] or size + mine[0] > room[1]):
            raise QuotaExceeded(f"pinned adapters may hold {room[0]:g} adapters and {room[1] / 2**20:.1f} MiB of this "
                                f"server's adapter cache (--max-pinned-share); {count} of {size / 2**20:.1f} MiB are "
                                f"pinned and this one is {mine[0] / 2**20:.1f} MiB; unpin one first", field="pin")
