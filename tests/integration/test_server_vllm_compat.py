"""vLLM's own /v1/load_lora_adapter and /v1/unload_lora_adapter, for admins, from --lora-roots."""

from __future__ import annotations


def test_admin_loads_from_a_configured_root_and_unloads(cluster):
    src = cluster.adapters["a3"]  # the session's adapter directory is a configured --lora-roots
    with cluster.http("admin") as admin:
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": "from-disk", "lora_path": str(src)})
        assert r.status_code == 200 and "added successfully" in r.text
        models = {m["id"] for m in admin.get("/v1/models").json()["data"]}
        assert "tiny:from-disk" in models
        out = admin.post("/v1/completions", json={"model": "tiny:from-disk", "prompt": "hello", "max_tokens": 3})
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
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
