"""Uploads are loaded by vLLM before they are registered (its own checks and loader decide), and
vLLM's /v1/load_lora_adapter works the same way: an adapter the engine refuses leaves nothing
registered, cached or stored; one it loads is the new version's cache entry.

A real AdapterService (registry, store, tenants, residency); the engine stands in for vLLM's
add_lora/remove_lora, which is what decides here.
"""

from __future__ import annotations

import asyncio

import pytest

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.config import Settings
from server.db import Database
from server.engine.vllm_engine import LoraLoadError
from server.errors import AdapterRejected, NotFound
from server.metrics import Metrics
from server.service import Service
from server.tenants import Role, TenantStore
from tests.adapter_files import adapter_files, tiny_base, uploads


class Engine:
    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.loaded: dict[int, str] = {}  # lora id -> path
        self.removed: list[int] = []
        self.names: list[str] = []  # every add_lora, in order
        self.ready = True

    async def add_lora(self, name, lora_id, path):
        self.names.append(name)
        if self.refuse:
            raise LoraLoadError("While loading ..., expected target modules in {...} but received [...]")
        self.loaded[lora_id] = path

    async def remove_lora(self, lora_id):
        self.loaded.pop(lora_id, None)
        self.removed.append(lora_id)


def make(tmp_path, engine, **settings) -> tuple[Service, object, str]:
    root = tmp_path / "loras"
    src = root / "mine"
    src.mkdir(parents=True)
    for name, data in adapter_files().items():
        (src / name).write_bytes(data)
    db = Database(tmp_path / "registry.sqlite3")
    settings = Settings(data_dir=tmp_path, max_model_len=256, lora_roots=[root], **settings)
    service = Service(settings, base=None, base_spec=tiny_base(), engine=engine, tokenizer=None,
                      tenants=TenantStore(db), registry=AdapterRegistry(db), store=AdapterStore(tmp_path / "adapters"),
                      metrics=Metrics())
    key = service.tenants.create("ops", Role.ADMIN)
    return service, asyncio.run(service.authenticate(f"Bearer {key}")), str(src)


def test_a_load_puts_the_adapter_in_the_engine_once(tmp_path):
    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    rec = asyncio.run(service.adapters.load_from_path(admin, "mine", src))
    entry = service.residency.get(rec.key)
    assert service.adapters.residency_of(rec) == "loaded" and entry.refs == 0  # loaded, not held
    assert list(engine.loaded) == [entry.lora_id] and engine.removed == []  # the validation load is kept


def test_an_adapter_the_engine_refuses_is_not_kept(tmp_path):
    engine = Engine(refuse=True)
    service, admin, src = make(tmp_path, engine)
    with pytest.raises(AdapterRejected, match="vLLM refused the adapter: While loading") as err:
        asyncio.run(service.adapters.load_from_path(admin, "mine", src))
    assert err.value.field == "lora_path"
    with pytest.raises(NotFound):
        service.adapters.get_adapter(admin, "mine")
    assert service.residency.entries() == []
    assert service.store.digests() == set()  # nothing entered the store
    assert list((service.store.root / ".staging").iterdir()) == []


def test_a_refused_upload_keeps_a_blob_another_adapter_uses(tmp_path):
    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    kept = asyncio.run(service.adapters.load_from_path(admin, "first", src))
    engine.refuse = True  # after a restart onto another vLLM, say: verdicts last one process
    service.adapters._accepted.clear()
    with pytest.raises(AdapterRejected):
        asyncio.run(service.adapters.upload(admin, "second", files=uploads(adapter_files())))
    assert service.adapters.get_adapter(admin, "first") == kept
    assert service.store.digests() == {kept.digest}


def test_a_validation_load_that_does_not_fit_leaves_the_engine(tmp_path):
    """With every cache entry pinned, the upload still registers; vLLM's copy is dropped, and
    the adapter loads on its first request."""
    engine = Engine()
    service, admin, src = make(tmp_path, engine, max_loras=1, max_cpu_loras=1)

    async def main():
        first = await service.adapters.load_from_path(admin, "first", src)
        await service.adapters.set_pinned(admin, "first", True)
        second = await service.adapters.upload(admin, "second", files=uploads(adapter_files(fingerprint=None)))
        return first, second

    first, second = asyncio.run(main())
    assert service.adapters.residency_of(first) == "loaded"
    assert service.adapters.residency_of(second) == "registered"
    assert list(engine.loaded) == [service.residency.get(first.key).lora_id]


def test_a_pin_that_cannot_load_leaves_the_adapter_unpinned(tmp_path):
    """Pinning loads the adapter first; when vLLM refuses that load (its blob went bad, say), the
    pin is refused with it and nothing is left pinned."""
    from server.errors import AdapterLoadFailed

    engine = Engine()
    service, admin, src = make(tmp_path, engine, max_cpu_loras=1, max_loras=1)

    async def main():
        await service.adapters.load_from_path(admin, "first", src)
        await service.adapters.upload(admin, "second", files=uploads(adapter_files(fingerprint=None)))  # evicts first
        assert service.adapters.residency_of(service.adapters.get_adapter(admin, "first")) == "registered"
        engine.refuse = True
        with pytest.raises(AdapterLoadFailed):
            await service.adapters.set_pinned(admin, "first", True)

    asyncio.run(main())
    rec = service.adapters.get_adapter(admin, "first")
    assert rec.pinned is False and service.residency.get(rec.key) is None



def test_content_already_accepted_is_registered_without_validating_it_again(tmp_path):
    """The same bytes again (a platform's copies of one adapter, a retried upload): no second pass
    of the rules or of vLLM's loader, one blob; the copy is loaded into the host tier's free room
    in the background, under its own name."""
    engine = Engine()
    service, admin, src = make(tmp_path, engine)

    async def main():
        first = await service.adapters.load_from_path(admin, "first", src)
        second = await service.adapters.upload(admin, "second", files=uploads(adapter_files()))
        await service.residency.prefetched()
        other = await service.adapters.upload(admin, "other", files=uploads(adapter_files(fingerprint=None)))
        return first, second, other

    first, second, other = asyncio.run(main())
    assert first.digest == second.digest != other.digest
    assert service.store.digests() == {first.digest, other.digest}
    # validate-<id> is a validation load; a version's key is a cache load
    assert [n.split("-")[0] if n.startswith("validate-") else n for n in engine.names] == \
        ["validate", second.key, "validate"]
    assert {service.adapters.residency_of(r) for r in (first, second, other)} == {"loaded"}


def test_a_copy_of_accepted_content_is_still_held_to_the_tenants_rank_quota(tmp_path):
    from server.errors import QuotaExceeded
    from server.tenants.store import Quotas

    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    asyncio.run(service.adapters.load_from_path(admin, "first", src))
    key = service.tenants.create("small", Role.TENANT, Quotas(max_rank=1))
    small = asyncio.run(service.authenticate(f"Bearer {key}"))
    with pytest.raises(QuotaExceeded, match="rank"):
        asyncio.run(service.adapters.upload(small, "copy", files=uploads(adapter_files())))


def test_copies_registered_at_once_are_judged_once_and_a_refusal_is_each_copys_own(tmp_path):
    engine = Engine()
    service, admin, src = make(tmp_path, engine, max_upload_bytes=1 << 20)

    async def main():
        return await asyncio.gather(*(service.adapters.upload(admin, f"copy{i}", files=uploads(adapter_files()))
                                      for i in range(4)))

    copies = asyncio.run(main())
    assert len({r.digest for r in copies}) == 1
    assert sum(n.startswith("validate-") for n in engine.names) == 1

    refusing = Engine(refuse=True)
    service, admin, src = make(tmp_path / "again", refusing, max_upload_bytes=1 << 20)

    async def refused():
        return await asyncio.gather(*(service.adapters.upload(admin, f"copy{i}", files=uploads(adapter_files()))
                                      for i in range(3)), return_exceptions=True)

    outcomes = asyncio.run(refused())
    assert all(isinstance(o, AdapterRejected) for o in outcomes)
    assert len(refusing.names) == 3 and service.store.digests() == set()  # each copy asked vLLM itself


def test_a_verdict_is_one_tenants_own(tmp_path):
    """Another tenant's copy of accepted bytes is judged again, as fresh content would be: no tenant
    can time whether another already sent an adapter."""
    engine = Engine()
    service, admin, src = make(tmp_path, engine)
    asyncio.run(service.adapters.load_from_path(admin, "first", src))
    key = service.tenants.create("other", Role.TENANT)
    other = asyncio.run(service.authenticate(f"Bearer {key}"))
    asyncio.run(service.adapters.upload(other, "mine", files=uploads(adapter_files())))
    asyncio.run(service.adapters.upload(other, "again", files=uploads(adapter_files())))
    assert sum(n.startswith("validate-") for n in engine.names) == 2  # once per tenant


class CountingStore(AdapterStore):
    """The real local store, counting the staging directories it hands out (each one a copy of
    an adapter's bytes)."""

    staged = 0

    def staging_dir(self):
        self.staged += 1
        return super().staging_dir()


def make_counting(tmp_path, engine) -> tuple[Service, object, str, CountingStore]:
    service, admin, src = make(tmp_path, engine)
    store = CountingStore(tmp_path / "adapters")
    service.adapters.store = service.store = store
    return service, admin, src, store


def test_a_server_path_with_content_already_stored_is_registered_without_copying_it(tmp_path):
    """A platform's 1000 adapters over 64 weight files: the copies are registered by their hash
    against the stored blob, with no bytes copied and no second judgment, each under its own
    name and loaded into the host tier's free room."""
    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)

    async def main():
        first = await service.adapters.load_from_path(admin, "first", src)
        copies = [await service.adapters.load_from_path(admin, f"copy{i}", src) for i in range(3)]
        await service.residency.prefetched()
        return first, copies

    first, copies = asyncio.run(main())
    assert store.staged == 1  # the first registration's copy only
    assert {r.digest for r in copies} == {first.digest} and store.digests() == {first.digest}
    assert sum(n.startswith("validate-") for n in engine.names) == 1
    assert [service.adapters.get_adapter(admin, f"copy{i}").version for i in range(3)] == [1, 1, 1]
    assert {service.adapters.residency_of(r) for r in copies} == {"loaded"}


def test_changed_files_at_a_known_path_go_the_whole_way(tmp_path):
    """The hash decides, not the path: edited weights are new content, copied and judged."""
    from pathlib import Path

    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    first = asyncio.run(service.adapters.load_from_path(admin, "first", src))
    for f in Path(src).iterdir():
        f.unlink()
    for name, data in adapter_files(fingerprint=None).items():
        (Path(src) / name).write_bytes(data)
    second = asyncio.run(service.adapters.load_from_path(admin, "second", src))
    assert second.digest != first.digest and store.staged == 2
    assert sum(n.startswith("validate-") for n in engine.names) == 2


def test_a_known_copy_is_still_held_to_the_tenants_rank_quota(tmp_path):
    """The verdict is remembered, the quota is read now: a tenant whose rank quota was lowered
    cannot register another copy of what it registered before."""
    from server.errors import QuotaExceeded
    from server.tenants.store import Quotas

    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    service.tenants.create("small", Role.TENANT)
    asyncio.run(service.adapters.load_from_path(admin, "one", src, tenant="small"))
    service.tenants.set_quotas("small", Quotas(max_rank=1))
    with pytest.raises(QuotaExceeded, match="rank") as err:
        asyncio.run(service.adapters.load_from_path(admin, "two", src, tenant="small"))
    assert err.value.field == "r" and store.staged == 1  # refused on the fast path, nothing copied
    assert [r.name for r in service.adapters.list_adapters(admin, "small")] == ["one"]


def test_a_known_copy_linking_outside_the_roots_is_still_refused(tmp_path):
    """The fast path hashes the files where they lie, under the same rule as a copy: a file that
    links outside --lora-roots is refused, even when its bytes are content already stored."""
    from server.errors import PermissionDenied

    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    asyncio.run(service.adapters.load_from_path(admin, "first", src))
    outside, sneaky = tmp_path / "outside", tmp_path / "loras" / "sneaky"
    outside.mkdir()
    sneaky.mkdir()
    for name, data in adapter_files().items():
        (outside / name).write_bytes(data)
        (sneaky / name).symlink_to(outside / name)
    with pytest.raises(PermissionDenied, match="outside") as err:
        asyncio.run(service.adapters.load_from_path(admin, "sneaky", str(sneaky)))
    assert err.value.field == "lora_path"
    with pytest.raises(NotFound):
        service.adapters.get_adapter(admin, "sneaky")


def test_a_known_copy_whose_blob_is_gone_goes_the_whole_way(tmp_path):
    """A verdict outlives the blob it was given for (every copy deleted, its grace passed): the
    next copy is staged, judged and stored again, not registered against nothing."""
    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    service.adapters.gc_grace_s = 0

    async def main():
        first = await service.adapters.load_from_path(admin, "first", src)
        await service.adapters.delete(admin, "first")
        assert store.digests() == set()
        again = await service.adapters.load_from_path(admin, "again", src)
        return first, again

    first, again = asyncio.run(main())
    assert again.digest == first.digest and store.digests() == {first.digest} and store.intact(first.digest)
    assert store.staged == 2


def test_a_known_copy_still_meets_the_name_and_count_rules(tmp_path):
    from server.errors import Conflict, QuotaExceeded
    from server.tenants.store import Quotas

    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    asyncio.run(service.adapters.load_from_path(admin, "first", src))
    with pytest.raises(Conflict):
        asyncio.run(service.adapters.load_from_path(admin, "first", src))
    service.tenants.create("small", Role.TENANT, Quotas(max_adapters=1))
    asyncio.run(service.adapters.load_from_path(admin, "one", src, tenant="small"))
    with pytest.raises(QuotaExceeded):
        asyncio.run(service.adapters.load_from_path(admin, "two", src, tenant="small"))
    assert [r.name for r in service.adapters.list_adapters(admin, "small")] == ["one"]


def test_a_known_copy_replaces_a_version_in_place(tmp_path):
    """vLLM's load_inplace over a path whose content is already stored: a new version, the old
    one retired, still with nothing copied."""
    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)

    async def main():
        await service.adapters.load_from_path(admin, "first", src)
        await service.adapters.upload(admin, "b", files=uploads(adapter_files(fingerprint=None)))
        staged = store.staged
        new = await service.adapters.load_from_path(admin, "b", src, replace=True)
        return staged, new

    staged, new = asyncio.run(main())
    assert store.staged == staged and new.version == 2
    assert service.adapters.get_adapter(admin, "b").digest == service.adapters.get_adapter(admin, "first").digest
    asyncio.run(service.adapters.settled())
    versions = service.registry._db.query("SELECT version, status FROM adapters WHERE name = 'b' ORDER BY version")
    assert [tuple(r) for r in versions] == [(2, "active")]  # version 1 retired, drained and reclaimed


def test_lora_modules_at_a_restart_are_not_copied_again(tmp_path):
    """--lora-modules registers at every start: files that did not change are kept as they are,
    with no copy of their bytes."""
    engine = Engine()
    service, admin, src, store = make_counting(tmp_path, engine)
    first = asyncio.run(service.adapters.register_modules([f"mod={src}"], "ops"))
    again = asyncio.run(service.adapters.register_modules([f"mod={src}"], "ops"))
    assert again == first and store.staged == 1
