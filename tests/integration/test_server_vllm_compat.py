"""vLLM's own /v1/load_lora_adapter and /v1/unload_lora_adapter, for admins, from --lora-roots."""

from __future__ import annotations

import re


def _metric(client, name: str) -> float:
    text = client.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


def test_admin_loads_from_a_configured_root_and_unloads(cluster):
    from tests.tiny import make_adapter

    # Under the session's adapter directory, a configured --lora-roots. Content this server has not
    # seen, so it is judged now (the server registers content it has accepted before without
    # loading it again in the request; README, "Refusal at upload").
    src = make_adapter(cluster.base, cluster.adapters["a3"].parent / "compat-fresh", seed=31, r=8)
    with cluster.http("admin") as admin:
        loads = _metric(admin, "loraplex_adapter_load_duration_seconds_count")
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "from-disk", "lora_path": str(src)})
        assert r.status_code == 200 and "added successfully" in r.text
        # Loaded into the engine now, as vLLM's endpoint does: the first request is a cache hit.
        assert admin.get("/v1/adapters/from-disk").json()["residency"] == "loaded"
        assert _metric(admin, "loraplex_adapter_load_duration_seconds_count") == loads + 1
        misses = _metric(admin, "loraplex_adapter_cache_misses_total")
        models = {m["id"] for m in admin.get("/v1/models").json()["data"]}
        assert "tiny:from-disk" in models
        out = admin.post("/v1/completions", json={"model": "tiny:from-disk", "prompt": "hello", "max_tokens": 3,
                                                       "ignore_eos": True})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert _metric(admin, "loraplex_adapter_cache_misses_total") == misses
        # Into another tenant's namespace: the admin picks it.
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "gift", "lora_path": str(src), "tenant": "bob"})
        assert r.status_code == 200
        r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "from-disk"})
        assert r.status_code == 200 and "removed successfully" in r.text
        assert "tiny:from-disk" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}
        escape = admin.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(src / ".." / "..")})
        assert escape.status_code == 403
    bob = cluster.client("bob")
    assert "tiny:gift" in {m.id for m in bob.models.list().data}


def test_a_link_out_of_the_roots_is_refused_and_nothing_is_registered(cluster, tmp_path):
    src = cluster.adapters["a3"]
    outside = tmp_path / "weights.safetensors"  # tmp_path is not under --lora-roots
    outside.write_bytes((src / "adapter_model.safetensors").read_bytes())
    linked = src.parent / "linked-out"
    linked.mkdir()
    try:
        (linked / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
        (linked / "adapter_model.safetensors").symlink_to(outside)
        with cluster.http("admin") as admin:
            r = admin.post("/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(linked)})
            assert r.status_code == 403, r.text
            assert r.json()["error"]["param"] == "lora_path" and "outside" in r.json()["error"]["message"]
            assert admin.get("/v1/adapters/linked").status_code == 404
            # A link that stays inside the roots is fine.
            (linked / "adapter_model.safetensors").unlink()
            (linked / "adapter_model.safetensors").symlink_to(src / "adapter_model.safetensors")
            r = admin.post("/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(linked)})
            assert r.status_code == 200, r.text
            assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "linked"}).status_code == 200
    finally:
        for f in linked.iterdir():
            f.unlink()
        linked.rmdir()


def test_the_same_bytes_uploaded_twice_share_one_blob_under_the_same_rules(cluster):
    src = cluster.adapters["a3"]
    files = [("files", (f.name, f.read_bytes())) for f in sorted(src.iterdir()) if f.suffix in (".json", ".safetensors")]
    with cluster.http("admin") as admin:
        first = admin.post("/v1/adapters", data={"name": "dup-1"}, files=files)
        assert first.status_code == 201, first.text
        # Known bytes plus a pickle: still refused, and nothing registered.
        bad = admin.post("/v1/adapters", data={"name": "dup-2"}, files=[*files, ("files", ("evil.bin", b"x"))])
        assert bad.status_code == 400 and "pickle" in bad.json()["error"]["message"]
        assert admin.get("/v1/adapters/dup-2").status_code == 404
        second = admin.post("/v1/adapters", data={"name": "dup-2"}, files=files)
        assert second.status_code == 201, second.text
        assert second.json()["digest"] == first.json()["digest"]
        out = admin.post("/v1/completions", json={"model": "tiny:dup-2", "prompt": "hello", "max_tokens": 3})
        assert out.status_code == 200
        for name in ("dup-1", "dup-2"):
            assert admin.delete(f"/v1/adapters/{name}").status_code == 200
