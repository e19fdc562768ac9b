"""Tenant isolation: the full matrix of caller x adapter owner x endpoint.

Another tenant's adapter must look exactly like a missing one (status and body),
so existence does not leak; admins may act on any tenant's adapters.
"""

from __future__ import annotations

import pytest

ENDPOINTS = {
    "chat": lambda h, name, owner: h.post("/v1/chat/completions", json={
        "model": f"tiny:{name}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "completions": lambda h, name, owner: h.post("/v1/completions", json={
        "model": f"tiny:{name}", "prompt": "hi", "max_tokens": 2}),
    "get": lambda h, name, owner: h.get(f"/v1/adapters/{name}"),
    "pin": lambda h, name, owner: h.post(f"/v1/adapters/{name}/pin"),
    "unpin": lambda h, name, owner: h.post(f"/v1/adapters/{name}/unpin"),
    "replace": lambda h, name, owner: h.put(f"/v1/adapters/{name}", files=owner.files()),
    "delete": lambda h, name, owner: h.delete(f"/v1/adapters/{name}"),
}


class Owner:
    def __init__(self, cluster, adapter):
        self.dir = cluster.adapters[adapter]

    def files(self):
        return [("files", (f.name, f.read_bytes())) for f in sorted(self.dir.iterdir()) if f.is_file()]


@pytest.fixture(scope="module")
def owned(cluster):
    for tenant in ("alice", "bob"):
        r = cluster.upload(tenant, f"iso-{tenant}", "a3")
        assert r.status_code in (201, 409), r.text
    return cluster


@pytest.mark.parametrize("endpoint", [e for e in ENDPOINTS if e != "delete"] + ["delete"])
def test_other_tenants_adapter_is_indistinguishable_from_missing(owned, endpoint):
    call = ENDPOINTS[endpoint]
    owner = Owner(owned, "a3")
    with owned.http("alice") as alice:
        foreign = call(alice, "iso-bob", owner)
        missing = call(alice, "no-such-adapter", owner)
    assert foreign.status_code == missing.status_code == 404, (foreign.text, missing.text)
    f, m = foreign.json()["error"], missing.json()["error"]
    assert f["message"].replace("iso-bob", "X") == m["message"].replace("no-such-adapter", "X")
    assert (f["type"], f["code"], f["param"]) == (m["type"], m["code"], m["param"])
    with owned.http("bob") as bob:  # and bob's adapter is untouched by alice's attempts
        assert bob.get("/v1/adapters/iso-bob").status_code == 200


@pytest.mark.parametrize("endpoint", ["chat", "completions", "get", "pin", "unpin", "replace"])
def test_owner_may_use_own_adapter(owned, endpoint):
    with owned.http("bob") as bob:
        r = ENDPOINTS[endpoint](bob, "iso-bob", Owner(owned, "a3"))
    assert r.status_code == 200, r.text


def test_listing_shows_only_own_adapters(owned):
    with owned.http("alice") as alice, owned.http("bob") as bob:
        a = {x["id"] for x in alice.get("/v1/adapters").json()["data"]}
        b = {x["id"] for x in bob.get("/v1/adapters").json()["data"]}
        assert "iso-alice" in a and "iso-bob" not in a
        assert "iso-bob" in b and "iso-alice" not in b
        r = alice.get("/v1/adapters", params={"tenant": "bob"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "tenant"


def test_admin_manages_any_tenant(owned):
    with owned.http("admin") as admin:
        r = admin.get("/v1/adapters", params={"tenant": "bob"})
        assert r.status_code == 200 and "iso-bob" in {x["id"] for x in r.json()["data"]}
        assert admin.get("/v1/adapters/iso-bob", params={"tenant": "bob"}).json()["tenant"] == "bob"
        assert admin.get("/v1/adapters", params={"tenant": "nobody"}).status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer lpx_wrong", "Basic abc", "Bearer"])
@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/v1/completions", "POST"), ("/v1/adapters", "GET"),
                                          ("/v1/adapters", "POST"), ("/v1/load_lora_adapter", "POST")])
def test_missing_or_wrong_key_is_401(owned, header, path, method):
    import httpx

    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, owned.url + path, headers=headers, json={"model": "tiny"}, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


def test_revoked_key_stops_working(owned, tmp_path):
    import subprocess
    import sys
    import time

    from tests.integration.server_proc import create_tenant

    key = create_tenant(owned.server.data_dir, "eve")
    owned.keys["eve"] = key
    with owned.http("eve") as eve:
        assert eve.get("/v1/models").status_code == 200
        subprocess.run([sys.executable, "-m", "server", "tenants", "revoke", "eve", "--data-dir",
                        str(owned.server.data_dir)], check=True, capture_output=True)
        time.sleep(1.2)  # the server's auth cache lives 1 s
        assert eve.get("/v1/models").status_code == 401


def test_load_lora_adapter_is_admin_only_and_rooted(owned, tmp_path):
    with owned.http("alice") as alice:
        r = alice.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(owned.adapters["a1"])})
        assert r.status_code == 403 and r.json()["error"]["param"] == "lora_path"
    with owned.http("admin") as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})
        assert r.status_code == 403 and "--lora-roots" in r.json()["error"]["message"]


# ---------------------------------------------------------------- the prefix cache


def _prefix_hits(cluster) -> float:
    with cluster.http("admin") as h:
        text = h.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm_prefix_cache_hits_total"))


def _cached_twice(cluster, first: str, second: str, prompt: list[int], **body) -> float:
    """Prefix-cache hits of ``first`` then ``second`` sending ``prompt``, then ``first`` again; read
    once ``first``'s own second request shows as hits, so the ones before it are counted too."""
    import time

    h0 = _prefix_hits(cluster)
    for who in (first, second, first):
        with cluster.http(who) as h:
            r = h.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1, **body})
            assert r.status_code == 200, r.text
    deadline = time.monotonic() + 60
    while (hits := _prefix_hits(cluster) - h0) <= 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hits > 0, "a tenant's own repeated prompt hit nothing: is prefix caching on?"
    return hits


def test_each_tenant_has_its_own_prefix_cache(cluster):
    """Another tenant's recent prompt is not in your prefix cache (else its TTFT tells you it was
    sent), even with the same client cache_salt; your own is."""
    import random

    rng = random.Random(7)
    for body in ({}, {"cache_salt": "shared-by-clients"}):
        prompt = [rng.randrange(3, 200) for _ in range(200)]
        hits = _cached_twice(cluster, "alice", "bob", prompt, **body)
        assert hits < len(prompt), f"bob's request hit alice's cached prefix ({hits} tokens)"


def test_tenants_an_operator_lets_share_share_the_prefix_cache(cluster):
    import random

    from tests.integration.server_proc import create_tenant

    for t in ("pc-shared-1", "pc-shared-2"):
        if t not in cluster.keys:
            cluster.keys[t] = create_tenant(cluster.server.data_dir, t)
    prompt = [random.Random(8).randrange(3, 200) for _ in range(200)]
    hits = _cached_twice(cluster, "pc-shared-1", "pc-shared-2", prompt)
    assert hits >= len(prompt), f"shared tenants did not share ({hits} tokens)"
