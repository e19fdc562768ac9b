"""``python -m server registry migrate``: an SQLite data directory into a shared registry and store.

Copies tenants (their key hashes, so every key keeps working), adapters (every version, with
its status and pin) and each name's version counter into the database at ``--to``, and the
blobs those rows refer to into ``--store-url`` (or leaves them in the data directory's store
when no URL is given). Rows and blobs already there are kept as they are, so running it again
copies nothing. Blobs are checked against their digests on the way.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from server.adapters.store import AdapterStore, digest_dir
from server.db import Database

logger = logging.getLogger(__name__)

TENANT_COLUMNS = ("name", "role", "key_hash", "key_prefix", "max_adapters", "max_rank", "requests_per_minute",
                  "created_at", "revoked_at", "max_concurrent_requests", "max_inflight_tokens")
ADAPTER_COLUMNS = ("tenant", "name", "version", "digest", "rank", "size_bytes", "target_modules", "base_fingerprint",
                   "pinned", "created_at", "status", "retired_at")


@dataclass
class Copied:
    tenants: int = 0
    adapters: int = 0
    blobs: int = 0
    skipped: list[str] = field(default_factory=list)
    """What was already there."""


def migrate(data_dir: Path, to_url: str, store=None) -> Copied:
    """Copy ``data_dir``'s SQLite registry into ``to_url``, and its blobs into ``store`` (a
    RemoteStore) when one is given. Idempotent."""
    src = Database.in_data_dir(data_dir)
    dst = Database(to_url)
    copied = Copied()
    tenants = src.query(f"SELECT {', '.join(TENANT_COLUMNS)} FROM tenants ORDER BY name")
    adapters = src.query(f"SELECT {', '.join(ADAPTER_COLUMNS)} FROM adapters ORDER BY tenant, name, version")
    versions = src.query("SELECT tenant, name, last_version FROM adapter_versions")
    if store is not None:  # blobs first: a row must never point at a blob the store lacks
        local = AdapterStore(Path(data_dir) / "adapters")
        for digest in sorted({row["digest"] for row in adapters}):
            if store.exists(digest):
                continue
            with store.staging_dir() as staging:
                for f in local.path(digest).iterdir():
                    shutil.copyfile(f, staging / f.name)
                if digest_dir(staging) != digest:
                    raise ValueError(f"blob {digest} in {local.root} does not match its digest; not copied")
                store.put(staging, digest=digest)
            copied.blobs += 1
    with dst.transaction() as conn:
        for row in tenants:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (row["name"],)).fetchone():
                copied.skipped.append(f"tenant {row['name']}")
                continue
            conn.execute(f"INSERT INTO tenants ({', '.join(TENANT_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(TENANT_COLUMNS))})", tuple(row[c] for c in TENANT_COLUMNS))
            copied.tenants += 1
        for row in adapters:
            if conn.execute("SELECT 1 FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
                            (row["tenant"], row["name"], row["version"])).fetchone():
                copied.skipped.append(f"adapter {row['tenant']}/{row['name']}@{row['version']}")
                continue
            conn.execute(f"INSERT INTO adapters ({', '.join(ADAPTER_COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(ADAPTER_COLUMNS))})", tuple(row[c] for c in ADAPTER_COLUMNS))
            copied.adapters += 1
        for row in versions:
            conn.execute("INSERT INTO adapter_versions (tenant, name, last_version) VALUES (?, ?, ?) ON CONFLICT "
                         "(tenant, name) DO UPDATE SET last_version = CASE WHEN excluded.last_version > "
                         "adapter_versions.last_version THEN excluded.last_version ELSE adapter_versions.last_version "
                         "END", (row["tenant"], row["name"], row["last_version"]))
    src.close()
    dst.close()
    return copied
