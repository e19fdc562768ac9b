"""Run the real `python -m server` in a subprocess and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_tenant(data_dir: Path, name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "server", "tenants", "create", name, "--data-dir", str(data_dir),
                          *args], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


class Process:
    """A server subprocess (argv) on ``port``, ready once GET ``ready_path`` answers 200."""

    ready_path = "/ready"

    def __init__(self, argv: list[str], port: int, log: Path):
        self.argv, self.port, self.log_path = argv, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "Process":
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=1).status_code == 200:
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
