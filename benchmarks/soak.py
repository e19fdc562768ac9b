"""Soak: many streaming clients for minutes while adapters are replaced and deleted under them,
optionally beside hostile clients. What breaks, what leaks, and what the attackers cost the rest.

One real ``python -m server`` on a tiny random Llama (made in the run). Well-behaved tenants run
``--clients`` closed-loop streaming clients, each request on the base or on one of the adapters,
while one adapter is replaced ``--replaces`` times and another deleted and uploaded again
``--recreates`` times. With ``--hostile`` these run beside them:

- bodies claiming 1 GiB sent without a key, and slow-drip bodies with a key (one byte a second);
- 1 MB prompts;
- one tenant firing ``n=16``, ``max_tokens`` at the context limit, ``ignore_eos`` (its tenant limited
  to 2 requests and 8192 tokens in flight, as an operator would set it).

Reported:
- failed requests: anything but a 200 stream that ends in ``[DONE]``, other than the documented
  429/503 with ``Retry-After`` and a 404 for the adapter while it is deleted (counted apart);
- blobs on disk at the end against the live versions;
- the server's resident memory (server + engine processes) growth after a warm-up;
- p50/p99 TTFT of the well-behaved tenants -- run once without and once with ``--hostile`` and
  compare (target: within 2x).

    python benchmarks/soak.py --duration 600 --clients 256 --out benchmarks/results/cpu/soak.json
    python benchmarks/soak.py --duration 600 --clients 256 --hostile --out benchmarks/results/cpu/soak-hostile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TENANTS = 4


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.ttft: list[float] = []
        self.failures: list[str] = []
        self.hostile: Counter[str] = Counter()


def _files(d: Path) -> list:
    return [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]


async def client(url: str, key: str, models: list[str], stats: Stats, stop: float, rng: random.Random) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as h:
        while time.monotonic() < stop:
            model = rng.choice(models)
            body = {"model": model, "prompt": "the date is", "max_tokens": 16, "stream": True, "temperature": 0.7}
            t0 = time.perf_counter()
            first = None
            try:
                async with h.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        if r.status_code in (429, 503) and "retry-after" in r.headers:
                            stats.outcomes[f"{r.status_code} with Retry-After"] += 1
                            await asyncio.sleep(float(r.headers["retry-after"]))
                        elif r.status_code == 404 and model.endswith(":recreated"):
                            stats.outcomes["404 while deleted"] += 1
                        else:
                            stats.outcomes[f"failed {r.status_code}"] += 1
                            stats.failures.append(f"{model}: {r.status_code} {r.text[:200]}")
                        continue
                    last = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if first is None:
                            first = time.perf_counter()
                        last = line
                        if '"error"' in line:
                            stats.outcomes["failed in-band"] += 1
                            stats.failures.append(f"{model}: {line[:200]}")
                    if last == "data: [DONE]":
                        stats.outcomes["ok"] += 1
                        stats.ttft.append(first - t0)
                    elif '"error"' not in (last or ""):
                        stats.outcomes["failed truncated"] += 1
            except httpx.HTTPError as e:
                stats.outcomes["failed transport"] += 1
                stats.failures.append(f"{model}: {type(e).__name__} {e}")


async def churn(url: str, admin: str, tenant: str, adapters: list[Path], replaces: int, recreates: int,
                duration: float, stats: Stats) -> None:
    """Replace 'replaced' ``replaces`` times and delete + re-upload 'recreated' ``recreates`` times,
    spread over the run."""
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=300) as h:
        events = [("replace", i) for i in range(replaces)] + [("recreate", i) for i in range(recreates)]
        random.Random(1).shuffle(events)
        gap = duration * 0.9 / max(1, len(events))
        for kind, i in events:
            await asyncio.sleep(gap)
            d = adapters[i % len(adapters)]
            if kind == "replace":
                r = await h.put(f"/v1/adapters/replaced?tenant={tenant}", files=_files(d))
                stats.outcomes["replace ok" if r.status_code == 200 else f"replace {r.status_code}"] += 1
            else:
                await h.delete(f"/v1/adapters/recreated?tenant={tenant}")
                await asyncio.sleep(0.5)
                r = await h.post(f"/v1/adapters?tenant={tenant}", data={"name": "recreated"}, files=_files(d))
                stats.outcomes["recreate ok" if r.status_code == 201 else f"recreate {r.status_code}"] += 1


async def hostile(url: str, port: int, key: str, stop: float, stats: Stats) -> None:
    """Attackers beside the soak: 1 GiB claims without a key, slow drips, 1 MB prompts, and a
    tenant asking for the most the context allows, 16 times over."""
    import httpx

    async def no_key_gib():
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1073741824\r\n\r\n" + b"{" * 65536)
                await writer.drain()
                status = (await asyncio.wait_for(reader.readline(), 30)).split()[1:2]
                stats.hostile[f"1 GiB without a key: {status[0].decode() if status else 'closed'}"] += 1
                writer.close()
            except (OSError, TimeoutError) as e:
                stats.hostile[f"1 GiB without a key: {type(e).__name__}"] += 1

    async def slow_drip():
        while time.monotonic() < stop:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n".encode())
                for _ in range(30):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(1)
                    if reader.at_eof():
                        break
                line = await asyncio.wait_for(reader.readline(), 30)
                stats.hostile[f"slow drip: {line.split()[1].decode() if line.split()[1:] else 'closed'}"] += 1
                writer.close()
            except (OSError, TimeoutError, ConnectionError) as e:
                stats.hostile[f"slow drip: {type(e).__name__}"] += 1

    async def big_prompts(h):
        while time.monotonic() < stop:
            r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 200_000, "max_tokens": 4})
            stats.hostile[f"1 MB prompt: {r.status_code}"] += 1

    async def greedy_tenant(h):
        while time.monotonic() < stop:
            try:
                r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 16, "temperature": 1.0,
                                                          "max_tokens": 250, "ignore_eos": True})
                stats.hostile[f"n=16 at the context limit: {r.status_code}"] += 1
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            except httpx.HTTPError as e:
                stats.hostile[f"n=16 at the context limit: {type(e).__name__}"] += 1

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as h:
        await asyncio.gather(no_key_gib(), no_key_gib(), slow_drip(), slow_drip(), big_prompts(h),
                             *(greedy_tenant(h) for _ in range(8)))


def tree_rss(pid: int) -> int:
    import psutil

    me = psutil.Process(pid)
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


async def run(a, server, keys: dict[str, str], adapters: list[Path]) -> dict:
    stats = Stats()
    models = ["tiny", "tiny:stable", "tiny:replaced", "tiny:recreated"]
    start = time.monotonic()
    stop = start + a.duration
    rss: list[tuple[float, int]] = []

    async def sample():
        while time.monotonic() < stop:
            rss.append((time.monotonic() - start, tree_rss(server.proc.pid)))
            await asyncio.sleep(5)

    tasks = [client(server.url, keys[f"t{i % TENANTS}"], models, stats, stop, random.Random(i))
             for i in range(a.clients)]
    tasks += [churn(server.url, keys["admin"], "t0", adapters, a.replaces, a.recreates, a.duration, stats), sample()]
    if a.hostile:
        tasks.append(hostile(server.url, server.port, keys["hostile"], stop, stats))
    await asyncio.gather(*tasks)
    warm = [v for t, v in rss if t >= a.warmup]
    ttft = sorted(stats.ttft)
    return {
        "outcomes": dict(stats.outcomes),
        "failed": sum(v for k, v in stats.outcomes.items() if k.startswith("failed")),
        "failures": stats.failures[:20],
        "hostile": dict(stats.hostile),
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": ttft[int(0.99 * (len(ttft) - 1))] if ttft else None,
        "rss_after_warmup_bytes": warm[0] if warm else None,
        "rss_end_bytes": warm[-1] if warm else None,
        "rss_growth": (warm[-1] / warm[0] - 1) if len(warm) > 1 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--replaces", type=int, default=100)
    ap.add_argument("--recreates", type=int, default=50)
    ap.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline")
    ap.add_argument("--hostile", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/loraplex-soak"))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    import httpx

    from tests.integration.server_proc import ServerProcess, create_tenant
    from tests.tiny import make_adapter, make_tiny_llama

    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    base = make_tiny_llama(a.work / "base")
    adapters = [make_adapter(base, a.work / "adapters" / f"v{i}", seed=200 + i, r=8) for i in range(4)]
    data = a.work / "data"
    keys = {"admin": create_tenant(data, "admin", "--admin")}
    for i in range(TENANTS):
        keys[f"t{i}"] = create_tenant(data, f"t{i}", "--rpm", "1000000", "--max-concurrency", "128",
                                      "--max-inflight-tokens", "1000000")
    # The attacker's tenant gets the limits an operator gives a tenant it does not trust to share:
    # two requests and 8192 tokens (max_tokens x n) in flight -- two of its n=16 requests at a time.
    keys["hostile"] = create_tenant(data, "hostile", "--rpm", "1000000", "--max-concurrency", "2",
                                    "--max-inflight-tokens", "8192")
    engine = ("--dtype", "float32", "--max-model-len", "256", "--kv-cache-bytes", str(256 << 20),
              "--max-lora-rank", "16", "--enforce-eager", "--max-loras", "2", "--max-cpu-loras", "8")
    server = ServerProcess(base, data, "--adapter-gc-grace-s", "5", log=a.work / "server.log", engine=engine).start(600)
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=300) as h:
            for name, d in (("stable", adapters[0]), ("replaced", adapters[1]), ("recreated", adapters[2])):
                h.post("/v1/adapters?tenant=t0", data={"name": name}, files=_files(d)).raise_for_status()
                for t in range(1, TENANTS):
                    h.post(f"/v1/adapters?tenant=t{t}", data={"name": name}, files=_files(d)).raise_for_status()
        t0 = time.perf_counter()
        result = asyncio.run(run(a, server, keys, adapters))
        result["seconds"] = time.perf_counter() - t0
        time.sleep(10)  # past --adapter-gc-grace-s: what is left on disk should be only what is live
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['admin']}"}, timeout=60) as h:
            live = {a["digest"].removeprefix("sha256:") for t in range(TENANTS)
                    for a in h.get(f"/v1/adapters?tenant=t{t}").json()["data"]}
        on_disk = {p.name for p in (data / "adapters" / "sha256").iterdir()}
        result |= {"blobs_on_disk": len(on_disk), "live_blobs": len(live), "orphan_blobs": len(on_disk - live),
                   "server_5xx_in_log": _count_5xx(a.work / "server.log")}
    finally:
        server.stop()
    result |= {"clients": a.clients, "duration_s": a.duration, "hostile_on": a.hostile, "replaces": a.replaces,
               "recreates": a.recreates, "host": platform.node(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


def _count_5xx(log: Path) -> dict[str, int]:
    """uvicorn's access log lines by 5xx status."""
    import re

    counts: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if m := re.search(r'HTTP/1\.1" (5\d\d)', line):
            counts[m.group(1)] += 1
    return dict(counts)


if __name__ == "__main__":
    main()
