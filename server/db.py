"""The registry database: one SQLite file (``<data_dir>/registry.sqlite3``) for tenants and adapters.

One connection, shared by every thread behind a lock, in WAL mode so that a
reader (``loraplex tenants list`` in another process) never blocks the server.
Writes go through :meth:`Database.transaction`, which takes SQLite's write lock
up front (``BEGIN IMMEDIATE``) so that a read-then-write can't be interleaved
with another writer. The schema is versioned by ``PRAGMA user_version``: each
entry of ``MIGRATIONS`` runs once, in order, all of them in one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILENAME = "registry.sqlite3"

# MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            name                TEXT PRIMARY KEY,
            role                TEXT NOT NULL,
            key_hash            TEXT NOT NULL UNIQUE,   -- sha256 hex of the API key; the key itself is never stored
            key_prefix          TEXT NOT NULL,          -- first characters of the key, to tell keys apart
            max_adapters        INTEGER NOT NULL,
            max_rank            INTEGER NOT NULL,
            requests_per_minute INTEGER NOT NULL,
            created_at          REAL NOT NULL,
            revoked_at          REAL
        )""",
        """CREATE TABLE adapters (
            tenant           TEXT NOT NULL REFERENCES tenants(name),
            name             TEXT NOT NULL,
            version          INTEGER NOT NULL,
            digest           TEXT NOT NULL,
            rank             INTEGER NOT NULL,
            size_bytes       INTEGER NOT NULL,
            target_modules   TEXT NOT NULL,             -- JSON list
            base_fingerprint TEXT,
            pinned           INTEGER NOT NULL DEFAULT 0,
            created_at       REAL NOT NULL,
            status           TEXT NOT NULL CHECK (status IN ('active', 'retired')),
            PRIMARY KEY (tenant, name, version)
        )""",
        # At most one active version per (tenant, name), even across processes.
        "CREATE UNIQUE INDEX adapters_one_active ON adapters(tenant, name) WHERE status = 'active'",
        "CREATE INDEX adapters_digest ON adapters(digest)",
    ),
    (
        # The highest version each (tenant, name) ever had, deleted or not: a name deleted and
        # uploaded again continues its numbering, so no two registrations share a version
        # (and the engine's cache keys, tenant/name@version, are never reused).
        """CREATE TABLE adapter_versions (
            tenant       TEXT NOT NULL,
            name         TEXT NOT NULL,
            last_version INTEGER NOT NULL,
            PRIMARY KEY (tenant, name)
        )""",
        "INSERT INTO adapter_versions SELECT tenant, name, MAX(version) FROM adapters GROUP BY tenant, name",
    ),
    (
        # Per-tenant limits on what runs at once (server/tenants/ratelimit.py: InFlightLimiter).
        "ALTER TABLE tenants ADD COLUMN max_concurrent_requests INTEGER NOT NULL DEFAULT 64",
        "ALTER TABLE tenants ADD COLUMN max_inflight_tokens INTEGER NOT NULL DEFAULT 262144",
    ),
)


class Database:
    """A thread-safe SQLite connection with the loraplex schema applied."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # isolation_level=None: no implicit BEGINs; transaction() issues its own.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            logger.warning("SQLite at %s runs in %s mode, not WAL", self.path, mode)
        self._conn.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> Database:
        return cls(Path(data_dir) / FILENAME)

    @property
    def schema_version(self) -> int:
        return self.query_one("PRAGMA user_version")[0]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block raises."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also after a failed COMMIT, which leaves it open
                    self._conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _migrate(self) -> None:
        with self.transaction() as conn:  # the write lock keeps two starting servers from both migrating
            current = conn.execute("PRAGMA user_version").fetchone()[0]
            if current > len(MIGRATIONS):
                raise RuntimeError(f"{self.path} has schema version {current}; this loraplex knows up to "
                                   f"{len(MIGRATIONS)} (was it written by a newer release?)")
            for version in range(current, len(MIGRATIONS)):
                logger.info("migrating %s to schema version %d", self.path, version + 1)
                for statement in MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
