"""Eviction order under a small byte budget, pinning, and restart persistence.

A second server with --adapter-cache-bytes sized for two adapters: the cache
state is read back the way an operator would, from GET /v1/adapters and /metrics.
An upload is loaded by vLLM to validate it and stays loaded, as `vllm serve
--lora-modules` loads its adapters at start, so uploads fill the cache too.
"""

from __future__ import annotations

import re

import psutil
import pytest

from tests.integration.conftest import _start_cluster


@pytest.fixture(scope="module")
def small(tiny_base, adapter_dirs, tmp_path_factory):
    size = sum(f.stat().st_size for f in adapter_dirs["a1"].iterdir() if f.is_file())
    c = _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, "--max-loras", "1", "--max-cpu-loras", "8",
                       "--adapter-cache-bytes", str(int(size * 2.5)), "--max-pins-per-tenant", "1", name="small")
    for name, adapter in (("x", "a1"), ("y", "a2"), ("z", "a3")):
        assert c.upload("alice", name, adapter).status_code == 201
    yield c
    c.server.stop()


def use(c, name):
    c.client("alice").completions.create(model=f"tiny:{name}", prompt="hello", max_tokens=1)


def loaded(c) -> list[str]:
    with c.http("alice") as h:
        return sorted(a["id"] for a in h.get("/v1/adapters").json()["data"] if a["residency"] == "loaded")


def evictions(c) -> float:
    m = re.search(r"^loraplex_adapter_cache_evictions_total (\S+)$", c.metrics(), re.M)
    return float(m.group(1))


def test_lru_eviction_and_pinning(small):
    c = small
    assert loaded(c) == ["y", "z"] and evictions(c) == 1  # uploading z (third) evicted x
    use(c, "x")  # y is least recently used
    assert loaded(c) == ["x", "z"] and evictions(c) == 2
    use(c, "y")  # now z is LRU
    assert loaded(c) == ["x", "y"] and evictions(c) == 3
    with c.http("alice") as h:
        assert h.post("/v1/adapters/x/pin").json()["pinned"] is True
    use(c, "y"), use(c, "z")  # x is LRU but pinned: y goes
    assert loaded(c) == ["x", "z"]
    use(c, "y")  # x still pinned: z goes
    assert loaded(c) == ["x", "y"] and evictions(c) == 5
    with c.http("alice") as h:
        assert h.post("/v1/adapters/x/unpin").json()["pinned"] is False
    use(c, "y"), use(c, "z")  # x unpinned and LRU: x goes
    assert loaded(c) == ["y", "z"] and evictions(c) == 6


def test_restart_keeps_registry_and_reloads_on_demand(small):
    c = small
    with c.http("alice") as h:
        h.post("/v1/adapters/z/pin")
        before = {a["id"]: a for a in h.get("/v1/adapters").json()["data"]}
    want = c.client("alice").completions.create(model="tiny:y", prompt="hello", max_tokens=6, temperature=0)
    engine_procs = psutil.Process(c.server.proc.pid).children(recursive=True)
    assert engine_procs, "vLLM runs its engine core in child processes"
    c.server.stop()  # SIGTERM, as a process manager would send
    _, alive = psutil.wait_procs(engine_procs, timeout=30)
    assert alive == [], "stopping the server must not orphan vLLM's engine processes"
    c.server.start()
    with c.http("alice") as h:
        after = {a["id"]: a for a in h.get("/v1/adapters").json()["data"]}
    assert set(after) == set(before) == {"x", "y", "z"}
    assert all(after[n]["residency"] == "registered" for n in after)  # nothing loaded until asked
    assert after["z"]["pinned"] is True
    assert {n: after[n]["digest"] for n in after} == {n: before[n]["digest"] for n in before}
    got = c.client("alice").completions.create(model="tiny:y", prompt="hello", max_tokens=6, temperature=0)
    assert got.choices[0].text == want.choices[0].text
    assert loaded(c) == ["y"]


def test_concurrent_cold_requests_share_one_load(small):
    """After the restart above, x is registered but not loaded. Six requests for it at once: one
    load, one miss, five hits, and it is in the engine before any of them runs."""
    from concurrent.futures import ThreadPoolExecutor

    c = small
    assert "x" not in loaded(c)

    def counters():
        text = c.metrics()
        get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return (get("loraplex_adapter_load_duration_seconds_count"), get("loraplex_adapter_cache_misses_total"),
                get("loraplex_adapter_cache_hits_total"))

    loads0, misses0, hits0 = counters()
    client = c.client("alice")
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: client.completions.create(model="tiny:x", prompt="hello", max_tokens=4,
                                                                 temperature=0).choices[0].text, range(6)))
    loads, misses, hits = counters()
    assert (loads - loads0, misses - misses0, hits - hits0) == (1, 1, 5)
    assert len(set(outs)) == 1


def test_pins_are_bounded_per_tenant_and_together(small):
    """One tenant's pins cannot fill the host tier (each bystander's cold adapter would be a 503):
    --max-pins-per-tenant 1 here, and pins together hold at most half of the cache's bytes (room
    for one of these adapters) before a tenant's pin is refused. After the restart above, z is
    pinned."""
    c = small
    with c.http("alice") as h:
        assert h.get("/v1/adapters/z").json()["pinned"] is True
        r = h.post("/v1/adapters/x/pin")
        e = r.json()["error"]
        assert r.status_code == 429 and e["code"] == "quota_exceeded" and e["param"] == "pin", e
        assert "--max-pins-per-tenant" in e["message"] and "retry-after" not in r.headers
        assert h.get("/v1/adapters/x").json()["pinned"] is False
    assert c.upload("bob", "cold", "a2").status_code == 201
    with c.http("bob") as h:  # bob's first pin: within his count, past the share
        r = h.post("/v1/adapters/cold/pin")
        assert r.status_code == 429 and r.json()["error"]["param"] == "pin", r.text
        assert "--max-pinned-share" in r.json()["error"]["message"]
    # bob's cold adapter still finds room, and serves.
    assert c.client("bob").completions.create(model="tiny:cold", prompt="hello", max_tokens=1).choices
    with c.http("alice") as h:  # unpinning gives the pin back
        assert h.post("/v1/adapters/z/unpin").json()["pinned"] is False
        assert h.post("/v1/adapters/x/pin").json()["pinned"] is True
        assert h.post("/v1/adapters/x/unpin").json()["pinned"] is False
