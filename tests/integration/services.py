"""Real services for the shared-state tests, started on loopback ports by the fixtures.

- PostgreSQL from Debian: ``initdb`` + ``pg_ctl`` in a temporary directory, as the ``postgres``
  user when the tests run as root (PostgreSQL refuses to run as root), on a free port.
- s3rver from npm (installed into the venv by scripts/install.sh): a standalone server that
  speaks the S3 API, storing objects in a directory. Chosen because it is a real S3 server a
  test can start and stop in a second -- MinIO is on neither PyPI, Debian nor npm, and moto is
  a mock of boto's client, not a server of its own.
- Redis from Debian, without persistence.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.integration.server_proc import free_port

ROOT = Path(__file__).resolve().parents[2]
S3RVER = Path(sys.executable).parents[1] / "node" / "node_modules" / ".bin" / "s3rver"
BUCKET = "loraplex"


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    return found[-1] if found else None


def have_postgres() -> bool:
    return _pg_bin("initdb") is not None and _pg_bin("pg_ctl") is not None


def have_redis() -> bool:
    return shutil.which("redis-server") is not None


def have_s3() -> bool:
    return S3RVER.exists() and shutil.which("node") is not None


class Postgres:
    """A PostgreSQL cluster of its own; :meth:`database` makes a fresh database in it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        self.port = free_port()
        self._run(_pg_bin("initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "loraplex", "-E", "UTF8")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} "
                  "-c fsync=off -c max_connections=200", "start")
        self._n = 0

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        subprocess.run([*prefix, *cmd], check=True, capture_output=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://loraplex@127.0.0.1:{self.port}/{db}"

    def database(self) -> str:
        import psycopg

        self._n += 1
        name = f"loraplex_{self._n}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


class S3:
    """s3rver on a loopback port, with a bucket; stop and start it again on the same port and data."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-s3-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a server (or obstore here) needs to reach it."""
        return {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER", "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def start(self) -> None:
        log = (self.dir / "s3rver.log").open("ab")
        self.proc = subprocess.Popen([str(S3RVER), "-d", str(self.dir / "data"), "-a", "127.0.0.1", "-p",
                                      str(self.port), "--configure-bucket", BUCKET, "--silent"],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(self.endpoint, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("s3rver did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        import socket

        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
