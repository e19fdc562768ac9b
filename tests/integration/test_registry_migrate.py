"""`python -m server registry migrate`: a server's SQLite data directory into PostgreSQL and S3.
The keys keep working, the adapters give identical greedy output, and a second run copies nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.integration.server_proc import ServerProcess, create_tenant
from tests.integration.services import Postgres, S3, have_postgres, have_s3

pytestmark = pytest.mark.skipif(not (have_postgres() and have_s3()) and not os.environ.get("CI"),
                                reason="PostgreSQL and s3rver are installed by scripts/install.sh")


def greedy(server, key, model):
    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"model": model, "prompt": "the date is", "max_tokens": 8, "temperature": 0,
                         "return_token_ids": True, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_migrate_then_serve_the_same(tiny_base, adapter_dirs, tmp_path):
    pg, s3 = Postgres(), S3()
    try:
        old = tmp_path / "old"
        key = create_tenant(old, "alice")
        server = ServerProcess(tiny_base, old, log=tmp_path / "old.log").start()
        files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter_dirs["a1"].iterdir()) if f.is_file()]
        r = httpx.post(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                       data={"name": "moved"}, files=files)
        assert r.status_code == 201, r.text
        want = greedy(server, key, "tiny:moved")
        server.stop()

        registry, store = pg.database(), s3.url("migrated")
        argv = [sys.executable, "-m", "server", "registry", "migrate", "--to", registry, "--store-url", store,
                "--data-dir", str(old)]
        env = {**os.environ, **s3.env()}
        first = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert first.returncode == 0, first.stderr
        assert "copied 1 tenants, 1 adapter versions, 1 blobs" in first.stdout
        again = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert "copied 0 tenants, 0 adapter versions, 0 blobs" in again.stdout

        new = ServerProcess(tiny_base, tmp_path / "new", "--registry-url", registry, "--store-url", store,
                            log=tmp_path / "new.log")
        new.env = s3.env()
        new.start()
        try:
            assert greedy(new, key, "tiny:moved") == want
        finally:
            new.stop()
    finally:
        s3.close()
        pg.stop()
