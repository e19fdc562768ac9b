"""The built wheel, installed into a fresh venv (no editable install, no source tree on the path),
serves gRPC: the protos travel as package data and the stubs are built into the wheel.

The fresh venv reaches the heavy dependencies (torch, vLLM) through a path line to this venv's
site-packages; a path line adds a directory without running its .pth files, so the editable
install of loraplex there stays out of the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import grpc

from server.api.grpc.pb import inference_pb2 as ipb
from server.api.grpc.pb import inference_pb2_grpc
from tests.integration.server_proc import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_serves_grpc_from_a_fresh_venv(tiny_base, tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(dist), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("loraplex-*.whl")
    venv = tmp_path / "fresh"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([py, "-c", "import server.api.grpc.pb as pb, server; print(server.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the wheel's copy, not the checkout

    data = tmp_path / "data"
    key = subprocess.run([py, "-m", "server", "tenants", "create", "w", "--data-dir", str(data)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    grpc_port = free_port()
    server = ServerProcess(tiny_base, data, "--grpc-port", str(grpc_port), log=tmp_path / "server.log")
    server.argv[0] = str(py)
    server.env = {"PYTHONPATH": None}
    server.cwd = tmp_path
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            replies = list(inference_pb2_grpc.InferenceStub(channel).Generate(
                ipb.GenerateRequest(model="tiny", prompt="hello", max_tokens=4, temperature=0),
                metadata=(("authorization", f"Bearer {key}"),), timeout=60))
        assert "".join(r.text for r in replies) and replies[-1].usage.completion_tokens == 4
    finally:
        server.stop()
