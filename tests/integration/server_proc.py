"""Run the real `python -m server` in a subprocess and wait until it is ready."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


LISTEN_PORTS = range(20000, 32000)
"""Where test servers listen: below the kernel's ephemeral range (32768-60999 by default), from
which every outgoing connection and every port-0 bind takes its port, and above Ray's worker
ports (10002-19999). A port taken from the ephemeral range was free when asked, and a client
connection or vLLM's own port-0 sockets could hold it by the time the server bound it, seconds
later (CI: "address already in use" on 39159)."""
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 no one listens on now, never the same twice in one test session."""
    low, high = LISTEN_PORTS.start, LISTEN_PORTS.stop - 1
    try:
        ephemeral = [int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()]
        if not (high < ephemeral[0] or low > ephemeral[1]):  # a host that moved the range over ours
            low, high = 1024, ephemeral[0] - 1
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random()
    for _ in range(1000):
        port = rng.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def request_head(method: str, path: str, length: int, key: str | None, ctype: str = "application/json") -> str:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n"


def upload_head(name: str | None, boundary: str = "b") -> bytes:
    """An upload form's ``name`` field and the head of its first file part: what a server needs to
    refuse the upload before the files' bytes."""
    field = f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n' if name else ""
    return (field + f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            'filename="adapter_model.safetensors"\r\n\r\n').encode()


def raw_request(port: int, head: str, body: bytes = b"", *, wait: float = 15.0) -> tuple[int, dict, bytes, float]:
    """Send a request by hand (a lying Content-Length, a stalled body); (status, headers, body, seconds)."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    elapsed = time.time() - t0
    head_part, _, rest = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest, elapsed


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def create_tenant(data_dir: Path, name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "server", "tenants", "create", name, "--data-dir", str(data_dir),
                          *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


class Process:
    """A server subprocess (argv) on ``port``, ready once GET ``ready_path`` answers 200."""

    ready_path = "/ready"

    def __init__(self, argv: list[str], port: int, log: Path):
        self.argv, self.port, self.log_path = argv, port, log
        self.scheme, self.verify = "http", True  # https, and the CA file to trust, for a TLS server
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str | None] = {}
        """Extra environment for the next start (LORAPLEX_FAILPOINTS, say); None removes a variable."""
        self.cwd: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "Process":
        self.log = self.log_path.open("ab")
        env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}.items() if v is not None}
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=1, verify=self.verify).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def kill9(self) -> None:
        """SIGKILL the server and every process under it (vLLM's engine core), as a crash would."""
        import psutil

        procs = psutil.Process(self.proc.pid).children(recursive=True) + [psutil.Process(self.proc.pid)]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait()
        self.log.close()

    def engine_core(self):
        """vLLM's engine-core process under the server (psutil.Process)."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise LookupError("no vLLM engine-core process under the server")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def wait_for_log(self, text: str, *, since: int = 0, timeout: float = 60) -> None:
        """Until ``text`` appears in the log after byte ``since`` (a :meth:`log_size` taken before)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(since)
                if text.encode() in f.read():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before logging {text!r}")
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not in the server log after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


class RawProcess(Process):
    """vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``), ready on /health."""

    ready_path = "/health"


# The test server's engine: small, fp32 (so greedy tokens equal PEFT's), eager (fast start).
TEST_ENGINE = ("--dtype", "float32", "--max-model-len", "256", "--kv-cache-bytes", str(64 << 20),
               "--max-lora-rank", "16", "--enforce-eager")


class ServerProcess(Process):
    """``python -m server`` on the tiny base, served as ``tiny``."""

    def __init__(self, base: Path, data_dir: Path, *extra: str, log: Path, engine: tuple[str, ...] = TEST_ENGINE):
        self.base, self.data_dir, self.extra = base, data_dir, extra
        port = free_port()
        argv = [sys.executable, "-m", "server", "--base", str(base), "--data-dir", str(data_dir),
                "--port", str(port), "--served-name", "tiny", *engine, *extra]
        super().__init__(argv, port, log)
