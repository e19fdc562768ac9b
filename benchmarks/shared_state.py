"""Shared state: how long a write made through server A takes to be served by server B.

Two real ``python -m server`` processes on a tiny random Llama (made in the run) share a
PostgreSQL registry, an S3 store (s3rver) and Redis rate limits, all started here as the tests
start them (tests/integration/services.py). ``--rounds`` times each:

- upload through A, then ask B for the adapter until it answers 200 (its blob fetched from
  the store, verified and loaded: the first request pays for that);
- replace through B, then ask A until its greedy tokens are the new version's;
- delete through A, then ask B until it answers 404;
- revoke a tenant's key with the CLI, then ask B until it answers 401.

Each delay is measured from the write's acknowledgement to B's (or A's) first answer that
shows it, polling every 10 ms. The servers poll the registry's generation every 0.25 s.

    python benchmarks/shared_state.py --rounds 40 --out benchmarks/results/cpu/shared_state.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.server_proc import ServerProcess  # noqa: E402
from tests.integration.services import Postgres, Redis, S3  # noqa: E402
from tests.tiny import make_adapter, make_tiny_llama  # noqa: E402


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def until(check, timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("not propagated")
        time.sleep(0.01)
    return time.perf_counter() - t0


def files(adapter: Path) -> list:
    return [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir()) if f.is_file()]


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p50_s": statistics.median(xs), "p99_s": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "max_s": xs[-1], "mean_s": statistics.fmean(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-shared-"))
    base = make_tiny_llama(tmp / "base")
    adapters = [make_adapter(base, tmp / f"a{i}", seed=i) for i in (1, 2)]
    pg, s3, redis = Postgres(), S3(), Redis()
    servers = []
    try:
        registry = pg.database()
        flags = ("--registry-url", registry, "--store-url", s3.url("bench"), "--rate-limit-url", redis.url)
        key = cli("tenants", "create", "alice", "--registry-url", registry, "--rpm", "1000000")
        for name in ("a", "b"):
            server = ServerProcess(base, tmp / f"data-{name}", *flags, log=tmp / f"{name}.log")
            server.env = s3.env()
            servers.append(server.start())
        a_url, b_url = servers[0].url, servers[1].url
        h = {"Authorization": f"Bearer {key}"}
        client = httpx.Client(timeout=60, headers=h)

        def complete(url: str, model: str) -> httpx.Response:
            return client.post(f"{url}/v1/completions", json={"model": model, "prompt": "the date is", "max_tokens": 4,
                                                              "temperature": 0, "return_token_ids": True})

        delays = {"upload_a_served_b": [], "replace_b_served_a": [], "delete_a_404_b": [], "revoke_401_b": []}
        for i in range(a.rounds):
            name = f"r{i}"
            r = client.post(f"{a_url}/v1/adapters", data={"name": name}, files=files(adapters[0]))
            assert r.status_code == 201, r.text
            delays["upload_a_served_b"].append(until(lambda: complete(b_url, f"tiny:{name}").status_code == 200))
            old = complete(a_url, f"tiny:{name}").json()["choices"][0]["token_ids"]
            r = client.put(f"{b_url}/v1/adapters/{name}", files=files(adapters[1]))
            assert r.status_code == 200, r.text
            delays["replace_b_served_a"].append(until(
                lambda: complete(a_url, f"tiny:{name}").json()["choices"][0]["token_ids"] != old))
            assert client.delete(f"{a_url}/v1/adapters/{name}").status_code == 200
            delays["delete_a_404_b"].append(until(lambda: complete(b_url, f"tiny:{name}").status_code == 404))
            leaving = cli("tenants", "create", f"leaving{i}", "--registry-url", registry)
            assert until(lambda: httpx.get(f"{b_url}/v1/models", headers={"Authorization": f"Bearer {leaving}"})
                         .status_code == 200) < 30
            cli("tenants", "revoke", f"leaving{i}", "--registry-url", registry)
            delays["revoke_401_b"].append(until(lambda: httpx.get(f"{b_url}/v1/models", headers={
                "Authorization": f"Bearer {leaving}"}).status_code == 401))
            print(json.dumps({k: round(v[-1], 3) for k, v in delays.items()}), flush=True)
        result = {k: summary(v) for k, v in delays.items()} | {
            "rounds": a.rounds, "poll_s": 0.25, "host": platform.node(), "cpus": os.cpu_count(),
            "command": " ".join(["benchmarks/shared_state.py", *sys.argv[1:]])}
        print(json.dumps(result, indent=1))
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        for server in servers:
            server.stop()
        redis.stop()
        s3.close()
        pg.stop()


if __name__ == "__main__":
    main()
