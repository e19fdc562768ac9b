"""The registry database: tenants and adapters, in SQLite (one host) or PostgreSQL (several).

One code path for both, through SQLAlchemy's engine and the drivers' own SQL (``?``
placeholders, rewritten for psycopg). ``--registry-url`` picks the backend:
``sqlite:///<data-dir>/registry.sqlite3`` by default, ``postgresql://user@host/db`` to share
the registry between servers.

- **Writes** go through :meth:`Database.transaction`. On SQLite it takes the write lock up front
  (``BEGIN IMMEDIATE``), so a read-then-write cannot interleave with another writer; on
  PostgreSQL, :meth:`Conn.lock_tenant` locks the tenant's row for the same purpose (two uploads
  at a tenant's quota, through two servers: exactly one passes).
- **Change propagation.** Every write transaction bumps one shared counter,
  ``registry_state.generation``. Each server keeps an in-memory snapshot of what it serves and
  refreshes it when the counter moves: after its own writes at once, and for other servers'
  writes by polling the counter (``server.runtime.watch_registry``, every 0.25 s). No SQL on
  the request path.
- **Schema** versions live in ``loraplex_schema``; each entry of :data:`MIGRATIONS` runs once,
  in order, under a lock (SQLite's write lock, PostgreSQL's advisory lock). Types are written
  for SQLite and widened for PostgreSQL (INTEGER -> BIGINT, REAL -> DOUBLE PRECISION).
"""

from __future__ import annotations

import logging
import re
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
    (
        # One counter every write transaction bumps: how servers sharing the registry learn of a change.
        "CREATE TABLE registry_state (id INTEGER PRIMARY KEY, generation INTEGER NOT NULL)",
        "INSERT INTO registry_state (id, generation) VALUES (1, 0)",
        # When a version was retired: a server starting on a shared registry reclaims one retired
        # long ago, whose own server crashed before it drained (adapters/service.py: recover).
        "ALTER TABLE adapters ADD COLUMN retired_at REAL",
    ),
)

_ADVISORY_LOCK = 0x6C6F7261706C6578  # "loraplex": one migration at a time across servers


def sqlite_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir) / FILENAME}"


def _driver_url(url: str) -> str:
    """postgresql:// and postgres:// mean psycopg 3 (SQLAlchemy's default would be psycopg2)."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


class Row(dict):
    """A result row, by column name and by position (as sqlite3.Row is)."""

    def __init__(self, keys: Sequence[str], values: Sequence[Any]):
        super().__init__(zip(keys, values))
        self._values = tuple(values)

    def __getitem__(self, key):
        return self._values[key] if isinstance(key, (int, slice)) else super().__getitem__(key)

    def __iter__(self):  # values, as sqlite3.Row's (tuple(row), unpacking); names are keys()
        return iter(self._values)


class Result:
    def __init__(self, cursor):
        self.rowcount = cursor.rowcount
        if cursor.returns_rows:
            keys = list(cursor.keys())
            self._rows = [Row(keys, tuple(r)) for r in cursor.fetchall()]
        else:
            self._rows = []

    def fetchone(self) -> Row | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Row]:
        return self._rows

    def __iter__(self):
        return iter(self._rows)


class Conn:
    """A connection inside a transaction, with the driver-SQL interface the stores use."""

    def __init__(self, connection, db: Database):
        self._c, self._db = connection, db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return Result(self._c.exec_driver_sql(self._db.sql(sql), tuple(params)))

    def lock_tenant(self, tenant: str) -> None:
        """Serialize writes that read-then-write one tenant's rows (SQLite's BEGIN IMMEDIATE already does)."""
        if self._db.dialect == "postgresql":
            self.execute("SELECT 1 FROM tenants WHERE name = ? FOR UPDATE", (tenant,))


class Database:
    """The registry database with the loraplex schema applied; safe to share between threads."""

    def __init__(self, url_or_path: str | Path, *, busy_timeout_ms: int = 5000):
        from sqlalchemy import create_engine, event

        url = str(url_or_path)
        if "://" not in url:  # a file path: SQLite
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{url}"
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        if self.dialect == "sqlite":
            path = Path(url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.path: Path | None = path
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "isolation_level": None,
                                                           "timeout": busy_timeout_ms / 1000})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi, _record):
                cur = dbapi.cursor()
                cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    logger.warning("SQLite at %s runs in %s mode, not WAL", path, mode)
                cur.execute("PRAGMA synchronous = NORMAL")  # durable at each checkpoint; safe with WAL
                cur.execute("PRAGMA foreign_keys = ON")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _begin(conn):  # writers take the write lock up front; readers never wait for it (WAL)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")
        else:
            self.path = None
            self.engine = create_engine(_driver_url(url), pool_pre_ping=True, pool_size=8, max_overflow=8)
        self._lock = threading.Lock()
        self.generation = 0
        """The last ``registry_state.generation`` this process saw (its own writes, or :meth:`poll`)."""
        self._migrate()
        self.poll()

    @property
    def shared(self) -> bool:
        """Other servers may write it too."""
        return self.dialect != "sqlite"

    @classmethod
    def in_data_dir(cls, data_dir: str | Path) -> Database:
        return cls(Path(data_dir) / FILENAME)

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.dialect == "postgresql" else text

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Conn]:
        """A transaction, committed if the block returns; a write transaction also bumps the
        shared generation, so every server sharing the registry sees the change."""
        with self.engine.connect() as connection:
            connection.info["write"] = True  # SQLite: BEGIN IMMEDIATE (see the "begin" listener)
            try:
                with connection.begin():
                    conn = Conn(connection, self)
                    yield conn
                    if write:
                        generation = conn.execute(
                            "UPDATE registry_state SET generation = generation + 1 WHERE id = 1 RETURNING generation"
                        ).fetchone()[0]
            finally:
                connection.info["write"] = False
        if write:
            with self._lock:
                self.generation = max(self.generation, generation)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.engine.connect() as connection:
            return Result(connection.exec_driver_sql(self.sql(sql), tuple(params))).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def poll(self) -> int:
        """Read the shared generation (a write by any server moves it); returns it."""
        row = self.query_one("SELECT generation FROM registry_state WHERE id = 1")
        with self._lock:
            self.generation = max(self.generation, row[0] if row else 0)
            return self.generation

    @property
    def schema_version(self) -> int:
        with self.transaction(write=False) as conn:
            return self._version_of(conn)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- migrations

    def _version_of(self, conn: Conn) -> int:
        run = conn.execute
        if self.dialect == "sqlite":
            exists = run("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'loraplex_schema'").fetchone()
            if not exists:  # a registry from before loraplex_schema kept its version in user_version
                return run("PRAGMA user_version").fetchone()[0]
        else:
            exists = run("SELECT 1 FROM information_schema.tables WHERE table_name = 'loraplex_schema' "
                         "AND table_schema = current_schema()").fetchone()
            if not exists:
                return 0
        return run("SELECT version FROM loraplex_schema").fetchone()[0]

    def _migrate(self) -> None:
        with self.transaction(write=False) as conn:  # SQLite: the write lock; PostgreSQL: an advisory lock
            if self.dialect == "postgresql":
                conn.execute(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK})")
            current = self._version_of(conn)
            if current > len(MIGRATIONS):
                raise RuntimeError(f"{self.url} has schema version {current}; this loraplex knows up to "
                                   f"{len(MIGRATIONS)} (was it written by a newer release?)")
            for version in range(current, len(MIGRATIONS)):
                logger.info("migrating %s to schema version %d", _safe(self.url), version + 1)
                for statement in MIGRATIONS[version]:
                    conn.execute(self._typed(statement))
            if current < len(MIGRATIONS):
                conn.execute("CREATE TABLE IF NOT EXISTS loraplex_schema (version INTEGER NOT NULL)")
                conn.execute("DELETE FROM loraplex_schema")
                conn.execute("INSERT INTO loraplex_schema (version) VALUES (?)", (len(MIGRATIONS),))
                if self.dialect == "sqlite":
                    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    def _typed(self, statement: str) -> str:
        if self.dialect == "postgresql":
            statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
            statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
        return statement


def _safe(url: str) -> str:
    """A URL without its password, for logs."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
