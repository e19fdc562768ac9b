"""The registry database: WAL on, foreign keys on, the schema migrated once."""

import sqlite3

import pytest

from server.db import FILENAME, MIGRATIONS, Database


def test_wal_mode_and_foreign_keys(tmp_path):
    db = Database.in_data_dir(tmp_path)
    assert db.query_one("PRAGMA foreign_keys")[0] == 1
    # journal_mode=WAL is stored in the file: any other connection sees it too.
    other = sqlite3.connect(tmp_path / FILENAME)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {"tenants",
                                                                                                 "adapters"}


def test_schema_is_migrated_once(tmp_path):
    Database(tmp_path / "r.sqlite3").close()
    db = Database(tmp_path / "r.sqlite3")  # reopening must not re-run CREATE TABLE
    assert db.schema_version == len(MIGRATIONS)


def test_newer_schema_is_refused(tmp_path):
    conn = sqlite3.connect(tmp_path / "r.sqlite3")
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer release"):
        Database(tmp_path / "r.sqlite3")


def test_transaction_rolls_back_on_error(tmp_path):
    db = Database(tmp_path / "r.sqlite3")
    with pytest.raises(KeyError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO tenants (name, role, key_hash, key_prefix, max_adapters, max_rank, requests_per_minute, "
                         "created_at) VALUES ('a', 'tenant', 'h', 'lpx_abcd', 1, 8, 1, 0)")
            raise KeyError("boom")
    assert db.query("SELECT * FROM tenants") == []
