"""vLLM's /v1/load_lora_adapter at the service layer: register, then load into the engine
as vLLM does; an adapter the engine refuses leaves nothing registered and no blob stored.

A real Service (registry, store, tenants, residency); the engine stands in for vLLM's
add_lora/remove_lora, which is what decides here.
"""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.config import Settings
from server.db import Database
from server.errors import AdapterRejected, NotFound
from server.metrics import Metrics
from server.service import Service
from server.tenants import Role, TenantStore
from tests.adapter_files import adapter_files, tiny_base


class Engine:
    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.added: list[str] = []
        self.removed: list[int] = []

    async def add_lora(self, name, lora_id, path):
        if self.refuse:
            raise RuntimeError("Loading lora failed: expected target modules ...")
        self.added.append(name)

    async def remove_lora(self, lora_id):
        self.removed.append(lora_id)


def make(tmp_path, engine) -> tuple[Service, object, str]:
    root = tmp_path / "loras"
    src = root / "mine"
    src.mkdir(parents=True)
    for name, data in adapter_files().items():
        (src / name).write_bytes(data)
    db = Database(tmp_path / "registry.sqlite3")
    settings = Settings(data_dir=tmp_path, max_model_len=256, lora_roots=[root])
    service = Service(settings, base=None, base_spec=tiny_base(), engine=engine, tokenizer=None,
                      tenants=TenantStore(db), registry=AdapterRegistry(db), store=AdapterStore(tmp_path / "adapters"),
                      metrics=Metrics())
    key = service.tenants.create("ops", Role.ADMIN)
    return service, service.authenticate(f"Bearer {key}"), str(src)


def test_a_load_puts_the_adapter_in_the_engine(tmp_path):
    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    rec = asyncio.run(service.load_from_path(admin, "mine", src))
    assert engine.added == [rec.key]
    assert service.residency_of(rec) == "loaded"
    assert service.residency.get(rec.key).refs == 0  # loaded, not held


def test_an_adapter_the_engine_refuses_is_not_kept(tmp_path):
    engine = Engine(refuse=True)
    service, admin, src = make(tmp_path, engine)
    with pytest.raises(AdapterRejected, match="vLLM could not load") as err:
        asyncio.run(service.load_from_path(admin, "mine", src))
    assert err.value.field == "lora_path"
    with pytest.raises(NotFound):
        service.get_adapter(admin, "mine")
    assert service.residency.entries() == []
    assert service.store.digests() == set()  # the blob went with the registration


def test_a_refused_load_keeps_a_blob_another_adapter_uses(tmp_path):
    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    kept = asyncio.run(service.load_from_path(admin, "first", src))
    engine.refuse = True
    with pytest.raises(AdapterRejected):
        asyncio.run(service.load_from_path(admin, "second", src))
    assert service.get_adapter(admin, "first") == kept
    assert service.store.digests() == {kept.digest}
