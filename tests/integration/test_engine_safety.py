"""No tenant's adapter can take the shared engine down, nothing is pulled from under a request,
and health tells the truth when the engine does die.

One server of its own: 1 LoRA slot, 2 adapters in the host tier, blobs reclaimed as soon as
nothing needs them (--adapter-gc-grace-s 0), gRPC on. Every check is made the way a client or
an operator would: HTTP and gRPC responses, /metrics, and the data directory on disk.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from benchmarks.mixed_traffic import check
from tests.integration.conftest import _start_cluster
from tests.tiny import make_adapter


@pytest.fixture(scope="module")
def safe(tiny_base, adapter_dirs, tmp_path_factory):
    c = _start_cluster(tiny_base, adapter_dirs, tmp_path_factory, "--max-loras", "1", "--max-cpu-loras", "2",
                       "--adapter-gc-grace-s", "0", "--engine-restarts", "2", name="safe", grpc=True)
    yield c
    c.server.stop()


def files_of(d) -> list:
    return [("files", (f.name, f.read_bytes())) for f in sorted(d.iterdir()) if f.is_file()]


def blobs(c) -> set[str]:
    return {p.name for p in (c.server.data_dir / "adapters" / "sha256").iterdir()}


def metric(c, name: str) -> float:
    text = c.metrics()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"))


def served(c, tenant: str, model: str) -> str:
    r = c.client(tenant).completions.create(model=model, prompt="the date is march", max_tokens=6, temperature=0)
    return r.choices[0].text


def test_an_adapter_vllm_would_refuse_is_refused_at_upload_and_the_engine_serves_on(safe, tmp_path):
    """The adapter that used to kill the engine on its first request (no lora_alpha)."""
    bad = make_adapter(safe.base, tmp_path / "bad", seed=7)
    config = json.loads((bad / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with safe.http("alice") as h:
        r = h.post("/v1/adapters", data={"name": "no-alpha"}, files=files_of(bad))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "lora_alpha" and "required" in err["message"] and err["code"] == "adapter_rejected"
        assert h.get("/v1/adapters/no-alpha").status_code == 404
    assert list((safe.server.data_dir / "adapters" / ".staging").iterdir()) == []
    assert served(safe, "bob", "tiny")  # every other tenant is still served
    assert httpx.get(f"{safe.url}/health").status_code == 200


def test_a_load_vllm_fails_at_request_time_fails_only_that_adapters_requests(safe, tmp_path):
    """The adapter's blob is damaged on disk after it was accepted: vLLM's load of it fails when a
    request brings it back into the engine. That request gets a 500 naming the adapter; the engine,
    the base and every other adapter keep serving."""
    fragile = make_adapter(safe.base, tmp_path / "fragile", seed=11)
    with safe.http("alice") as h:
        rec = h.post("/v1/adapters", data={"name": "fragile"}, files=files_of(fragile)).json()
        for i, adapter in enumerate(("a1", "a2")):  # two more uploads push it out of the 2-entry host tier
            assert safe.upload("alice", f"filler-{i}", adapter).status_code == 201
        assert h.get("/v1/adapters/fragile").json()["residency"] == "registered"
    weights = safe.server.data_dir / "adapters" / "sha256" / rec["digest"].removeprefix("sha256:")
    weights = weights / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    failures = metric(safe, "loraplex_adapter_load_failures_total")
    before = served(safe, "alice", "tiny:filler-0")

    results: dict[str, object] = {}

    def base_traffic():
        results["base"] = [served(safe, "bob", "tiny") for _ in range(4)]

    t = threading.Thread(target=base_traffic)
    t.start()
    with safe.http("alice") as h:
        r = h.post("/v1/completions", json={"model": "tiny:fragile", "prompt": "hello", "max_tokens": 4})
    t.join()
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_load_failed" and err["param"] == "model" and "'fragile'" in err["message"]
    assert len(results["base"]) == 4
    assert served(safe, "alice", "tiny:filler-0") == before
    assert metric(safe, "loraplex_adapter_load_failures_total") == failures + 1
    assert httpx.get(f"{safe.url}/health").status_code == 200
    with safe.http("alice") as h:
        assert h.delete("/v1/adapters/fragile").status_code == 200


def test_delete_under_a_running_request_keeps_the_blob_until_it_drains(safe, tmp_path):
    doomed = make_adapter(safe.base, tmp_path / "doomed", seed=13)
    with safe.http("alice") as h:
        digest = h.post("/v1/adapters", data={"name": "doomed"}, files=files_of(doomed)).json()["digest"][7:]
    client = safe.client("alice")
    stream = client.completions.create(model="tiny:doomed", prompt="hello", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)  # running now
    with safe.http("alice") as h:
        assert h.delete("/v1/adapters/doomed").status_code == 200
        assert h.get("/v1/adapters/doomed").status_code == 404  # gone for new requests at once
    assert digest in blobs(safe), "the blob went while a request was still using it"
    rest = list(chunks)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"  # the request finished on it
    deadline = time.time() + 10
    while digest in blobs(safe) and time.time() < deadline:
        time.sleep(0.1)
    assert digest not in blobs(safe), "drained, released and past its (zero) grace period: reclaimed"


def test_a_name_deleted_and_uploaded_again_serves_the_new_weights_at_once(safe):
    """Versions are never reused: a request still running on the deleted adapter keeps its own
    engine entry, and the re-upload (version 2) is served with its own weights from the start."""
    with safe.http("alice") as h:
        assert safe.upload("alice", "again", "a1").status_code == 201
        want_a1, want_a3 = served(safe, "alice", "tiny:again"), None
        stream = safe.client("alice").completions.create(model="tiny:again", prompt="hello", max_tokens=200,
                                                        stream=True, extra_body={"ignore_eos": True})
        chunks = iter(stream)
        next(chunks)
        assert h.delete("/v1/adapters/again").status_code == 200
        r = safe.upload("alice", "again", "a3")
        assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["residency"] != "draining"
        assert safe.upload("alice", "ref-a3", "a3").status_code == 201
        want_a3 = served(safe, "alice", "tiny:ref-a3")
        assert served(safe, "alice", "tiny:again") == want_a3 != want_a1
        list(chunks)


def test_clients_that_drop_their_streams_release_their_adapters(safe):
    """Two streams on the two adapters the host tier holds, dropped after their first chunk: the
    requests are aborted and the adapters released, so a third adapter still gets in."""
    with safe.http("alice") as h:
        for name, adapter in (("drop-1", "a1"), ("drop-2", "a2"), ("drop-3", "a4")):
            assert safe.upload("alice", name, adapter).status_code == 201
    cancelled = metric(safe, 'loraplex_requests_total{protocol="http",tenant="alice"')
    for name in ("drop-1", "drop-2"):
        with safe.http("alice") as h:
            with h.stream("POST", "/v1/completions", json={"model": f"tiny:{name}", "prompt": "hello",
                                                           "max_tokens": 240, "stream": True,
                                                           "ignore_eos": True}) as r:
                next(r.iter_bytes())
            # leaving the block closes the connection with the stream unread
    deadline = time.time() + 20
    while time.time() < deadline:
        text = safe.metrics()
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("loraplex_requests_total{") and 'status="cancelled"' in line)
        if dropped >= 2 and metric(safe, "vllm_num_requests_running") == 0:
            break
        time.sleep(0.2)
    assert dropped >= 2, "the dropped streams were never cancelled"
    assert metric(safe, "vllm_num_requests_running") == 0, "vLLM is still generating for clients that left"
    with safe.http("alice") as h:
        t0 = time.time()
        r = h.post("/v1/completions", json={"model": "tiny:drop-3", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert time.time() - t0 < 10  # admitted at once, not after waiting for room
    _ = cancelled


def test_many_replaces_leave_one_version_on_disk(safe):
    n = 200
    before = blobs(safe)
    assert safe.upload("bob", "churn", "a1").status_code == 201
    for i in range(n):
        r = safe.upload("bob", "churn", "a2" if i % 2 == 0 else "a1", method="PUT")
        assert r.status_code == 200, r.text
    card = r.json()
    assert card["version"] == n + 1
    deadline = time.time() + 10
    while (blobs(safe) - before) - {card["digest"][7:]} and time.time() < deadline:
        time.sleep(0.1)
    # a1's and a2's blobs may be shared with other adapters of this server; what must hold is that
    # the store holds nothing but what live rows use, and the registry one row for "churn"
    with safe.http("bob") as h:
        assert h.get("/v1/adapters/churn").json()["version"] == n + 1
    from server.db import Database

    db = Database.in_data_dir(safe.server.data_dir)
    rows = db.query("SELECT version, status FROM adapters WHERE tenant = 'bob' AND name = 'churn'")
    live = {r[0] for r in db.query("SELECT DISTINCT digest FROM adapters")}
    db.close()
    assert [tuple(r) for r in rows] == [(n + 1, "active")]
    assert blobs(safe) == live


def grpc_health(c, want, timeout: float = 5) -> bool:
    """gRPC health follows the engine within one poll (1 s): True once it reports ``want``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with c.channel() as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.time() < deadline:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == want:
                return True
            time.sleep(0.2)
    return False


def test_a_dead_engine_is_reported_then_restarted(safe):
    from grpc_health.v1 import health_pb2

    want = served(safe, "alice", "tiny:filler-1")
    restarts = metric(safe, "loraplex_engine_restarts_total")
    safe.server.engine_core().kill()  # as the OOM killer would
    deadline = time.time() + 15
    while httpx.get(f"{safe.url}/health").status_code == 200 and time.time() < deadline:
        time.sleep(0.2)
    health = httpx.get(f"{safe.url}/health")
    assert health.status_code == 503 and health.json()["status"] == "engine_dead"
    assert httpx.get(f"{safe.url}/ready").status_code == 503
    assert grpc_health(safe, health_pb2.HealthCheckResponse.NOT_SERVING)
    with safe.http("alice") as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_not_ready"
    deadline = time.time() + 180
    while httpx.get(f"{safe.url}/health").status_code != 200 and time.time() < deadline:
        time.sleep(0.5)
    assert httpx.get(f"{safe.url}/health").status_code == 200, safe.server.tail()
    assert metric(safe, "loraplex_engine_restarts_total") == restarts + 1
    assert metric(safe, "loraplex_engine_up") == 1
    assert grpc_health(safe, health_pb2.HealthCheckResponse.SERVING)
    assert served(safe, "alice", "tiny:filler-1") == want  # adapters reload on demand into the new engine
    # The new engine's processes carry the CPU LoRA kernel patch too: base and adapter requests
    # through its one LoRA slot each still get their own model.
    report = check(safe.url, safe.keys["alice"], safe.base, {"a1": safe.adapters["a1"], "a2": safe.adapters["a2"]},
                   {"a1": "tiny:filler-0", "a2": "tiny:filler-1"}, base_model="tiny", clients=8, requests=90)
    assert (report.errors, report.wrong) == (0, 0), report.examples
