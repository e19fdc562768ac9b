"""Reclaiming at the service layer: replaced versions (row and blob) once drained, blobs a cache
entry may still load kept, and start-up recovery of what a crash left."""

from __future__ import annotations

import asyncio
import json

from server.adapters.registry import AdapterRegistry
from server.adapters.service import recover
from server.adapters.store import AdapterStore
from server.adapters.upload import AdapterInfo
from server.db import Database
from server.tenants import TenantStore
from tests.adapter_files import adapter_files, lora_tensors, uploads
from tests.unit.test_load_lora_adapter import Engine, make


def variant(i: int) -> dict[str, bytes]:
    """A distinct adapter (distinct digest) per i."""
    return adapter_files(tensors=lora_tensors(seed=i), fingerprint=None)


def test_a_thousand_replaces_leave_one_version(tmp_path):
    engine = Engine()
    service, admin, _ = make(tmp_path, engine, adapter_gc_grace_s=0)

    async def main():
        await service.adapters.upload(admin, "bot", files=uploads(variant(0)))
        for i in range(1, 1001):
            rec = await service.adapters.upload(admin, "bot", files=uploads(variant(i)), replace=True)
        await service.adapters.settled()
        return rec

    rec = asyncio.run(main())
    assert rec.version == 1001
    assert [(r.version, r.status.value) for r in service.registry.records()] == [(1001, "active")]
    assert service.store.digests() == {rec.digest}
    assert len(engine.loaded) == 1  # and one copy in the engine


def test_a_replaced_version_still_serving_keeps_its_row_and_blob_until_it_drains(tmp_path):
    engine = Engine()
    service, admin, _ = make(tmp_path, engine, adapter_gc_grace_s=0)

    async def main():
        v1 = await service.adapters.upload(admin, "bot", files=uploads(variant(1)))
        entry = await service.residency.acquire(v1.key, str(service.store.path(v1.digest)), v1.size_bytes,
                                                digest=v1.digest)  # a request in flight on v1
        v2 = await service.adapters.upload(admin, "bot", files=uploads(variant(2)), replace=True)
        await service.adapters.gc()
        during = ({r.version for r in service.registry.records()}, service.store.digests())
        service.residency.release(entry)  # it finishes
        await asyncio.sleep(0)  # the drain's remove_lora runs in the background
        await service.adapters.settled()
        return v1, v2, during

    v1, v2, during = asyncio.run(main())
    assert during == ({1, 2}, {v1.digest, v2.digest})
    assert {r.version for r in service.registry.records()} == {2}
    assert service.store.digests() == {v2.digest}


def test_recover_repairs_each_kind_of_leftover(tmp_path):
    db = Database(tmp_path / "registry.sqlite3")
    TenantStore(db).create("acme")
    registry, store = AdapterRegistry(db), AdapterStore(tmp_path / "adapters")
    info = AdapterInfo(rank=8, target_modules=["q_proj"], size_bytes=10)

    def blob(data: bytes) -> str:
        with store.staging_dir() as path:
            (path / "adapter_config.json").write_text(json.dumps({"r": 8, "x": data.decode()}))
            (path / "adapter_model.safetensors").write_bytes(data)
            return store.put(path)[0]

    keep, old, orphan, broken = blob(b"keep"), blob(b"old"), blob(b"orphan"), blob(b"broken")
    registry.add("acme", "keep", keep, info, max_adapters=10)
    registry.add("acme", "swapped", old, info, max_adapters=10)
    registry.replace("acme", "swapped", keep, info)  # v1 (old) retired
    registry.add("acme", "broken", broken, info, max_adapters=10)
    (store.path(broken) / "adapter_model.safetensors").unlink()  # damaged by hand
    registry.add("acme", "missing", "f" * 64, info, max_adapters=10)  # row whose blob never landed
    (store.root / ".staging" / "upload-999999999-x").mkdir()  # no such process
    counts = recover(registry, store)
    assert counts == {"staging": 1, "retired_rows": 1, "rows_without_blob": 2, "orphan_blobs": 3}
    assert {(r.name, r.version) for r in registry.records()} == {("keep", 1), ("swapped", 2)}
    assert store.digests() == {keep}
    assert list((store.root / ".staging").iterdir()) == []
    assert recover(registry, store) == dict.fromkeys(counts, 0)  # idempotent
    _ = orphan, old


def test_a_dead_engine_drains_every_retired_version(tmp_path):
    """Requests on a dead engine have failed: what was waiting for them to drain is reclaimed."""
    engine = Engine()
    service, admin, _ = make(tmp_path, engine, adapter_gc_grace_s=0)

    async def main():
        v1 = await service.adapters.upload(admin, "bot", files=uploads(variant(1)))
        await service.residency.acquire(v1.key, str(service.store.path(v1.digest)), v1.size_bytes, digest=v1.digest)
        v2 = await service.adapters.upload(admin, "bot", files=uploads(variant(2)), replace=True)
        service.adapters.engine_lost()
        await service.adapters.gc()
        return v2

    v2 = asyncio.run(main())
    assert [r.version for r in service.registry.records()] == [2]
    assert service.store.digests() == {v2.digest} and service.residency.entries() == []
