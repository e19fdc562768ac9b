"""What the Ray ingress holds while uploads pass through it.

``python -m server --replicas 1`` on a tiny random Llama (made in the run), a real local Ray
cluster. ``--uploads`` clients (two tenants) each upload ``--size-mib`` of zeros at once, over
HTTP and then over gRPC; the replica refuses every one (no safetensors header), after staging it
whole. A thread samples the ingress process's RssAnon every 20 ms: its own memory, not the object
store's shared pages it maps. The cluster runs with MALLOC_MMAP_THRESHOLD_=131072, so that glibc
returns a freed piece at once and RssAnon is what the process holds, not what its arenas kept.

    python benchmarks/ingress_uploads.py --size-mib 256 --uploads 4 --rounds 2 \\
        --out benchmarks/results/cpu/ingress_uploads.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402

from server.api.grpc.pb import adapters_pb2 as apb, adapters_pb2_grpc  # noqa: E402
from tests.integration.server_proc import ServerProcess, create_tenant, free_port  # noqa: E402
from tests.tiny import make_tiny_llama  # noqa: E402


def anon_bytes(server: ServerProcess) -> int:
    (ingress,) = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                  if "LoraplexIngress" in " ".join(p.cmdline())]
    return int(open(f"/proc/{ingress.pid}/status").read().split("RssAnon:")[1].split()[0]) << 10


def form(size: int) -> list:
    """An upload form the replica refuses once staged: ``size`` bytes of zeros, no safetensors header."""
    return [("files", ("adapter_config.json", b"{}")), ("files", ("adapter_model.safetensors", b"\0" * size))]


def upload_over_http(url: str, key: str, name: str, files: list) -> int:
    with httpx.Client(base_url=url, timeout=600, headers={"Authorization": f"Bearer {key}"}) as h:
        return h.post("/v1/adapters", data={"name": name}, files=files).status_code


def upload_over_grpc(port: int, key: str, name: str, size: int) -> str:
    """The same upload as :func:`form`, as a gRPC stream of 1 MiB chunks; the status's name."""
    def chunks():
        yield apb.UploadRequest(metadata=apb.UploadMetadata(name=name))
        yield apb.UploadRequest(file=apb.FileChunk(filename="adapter_config.json", data=b"{}"))
        for _ in range(size >> 20):
            yield apb.UploadRequest(file=apb.FileChunk(filename="adapter_model.safetensors", data=b"\0" * (1 << 20)))

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            adapters_pb2_grpc.AdaptersStub(channel).Upload(chunks(), metadata=(("authorization", f"Bearer {key}"),),
                                                           timeout=600)
        except grpc.RpcError as e:
            return e.code().name
    return "OK"


def measure(server: ServerProcess, send, n: int) -> dict:
    """``send(i)`` for i in range(n) at once, the ingress's RssAnon sampled every 20 ms meanwhile."""
    before = anon_bytes(server)
    peak, done = [before], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], anon_bytes(server))

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(send, range(n)))
    finally:
        done.set()
        sampler.join()
    return {"seconds": round(time.perf_counter() - t0, 2), "answers": answers,
            "anon_before_mib": round(before / 2**20, 1), "peak_growth_mib": round((peak[0] - before) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--uploads", type=int, default=4, help="at once (the server's --max-uploads is 4)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    size = a.size_mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_tiny_llama(root / "base")
        data = root / "data"
        data.mkdir()
        tenants = [f"t{i}" for i in range((a.uploads + 1) // 2)]  # two uploads each (--max-uploads-per-tenant)
        keys = {t: create_tenant(data, t) for t in tenants}
        grpc_port = free_port()
        server = ServerProcess(base, data, "--replicas", "1", "--grpc-port", str(grpc_port), log=root / "server.log")
        server.env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
        server.start(timeout=400)
        files = form(size)

        def key(i: int) -> str:
            return keys[tenants[i // 2]]

        def over_http(i: int) -> int:
            return upload_over_http(server.url, key(i), f"big-{i}", files)

        def over_grpc(i: int) -> str:
            return upload_over_grpc(grpc_port, key(i), f"big-{i}", size)

        runs = []
        try:
            for front, send in (("http", over_http), ("grpc", over_grpc)):
                for r in range(a.rounds):
                    runs.append({"front": front, "round": r, **measure(server, send, a.uploads)})
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            server.stop()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"size_mib": a.size_mib, "uploads": a.uploads, "runs": runs, "commit": commit,
              "host": platform.node(), "cpus": os.cpu_count(),
              "command": "python benchmarks/ingress_uploads.py " + " ".join(sys.argv[1:])}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
