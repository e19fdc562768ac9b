"""The adapter registry: per-tenant names, versions, quotas, and what another tenant can see."""

from __future__ import annotations

import pytest

from server.adapters.registry import AdapterRegistry, AdapterStatus, validate_name
from server.adapters.upload import AdapterInfo
from server.db import Database
from server.errors import Conflict, InvalidArgument, NotFound, QuotaExceeded
from server.tenants import TenantStore

INFO = AdapterInfo(rank=8, target_modules=["q_proj", "v_proj"], size_bytes=1234, base_fingerprint="ab" * 32,
                   has_manifest=True)
D1, D2, D3 = "1" * 64, "2" * 64, "3" * 64


@pytest.fixture
def registry(tmp_path):
    db = Database(tmp_path / "registry.sqlite3")
    tenants = TenantStore(db)
    tenants.create("acme")
    tenants.create("globex")
    return AdapterRegistry(db)


def test_add_then_get(registry):
    record = registry.add("acme", "support-bot", D1, INFO, max_adapters=10)
    assert record.key == "acme/support-bot@1" and record.status is AdapterStatus.ACTIVE
    assert registry.get("acme", "support-bot") == record
    assert (record.rank, record.target_modules, record.pinned) == (8, ("q_proj", "v_proj"), False)


def test_find_and_count_see_only_the_tenants_active_versions(registry):
    """What an upload is checked against before its bytes are read (one row, not a listing)."""
    registry.add("acme", "bot", D1, INFO, max_adapters=10)
    registry.add("acme", "gone", D1, INFO, max_adapters=10)
    new, old = registry.replace("acme", "bot", D2, INFO)
    registry.delete("acme", "gone")
    registry.add("globex", "bot", D3, INFO, max_adapters=10)
    assert registry.find("acme", "bot") == new and old.version == 1 and new.version == 2
    assert registry.find("acme", "gone") is None and registry.find("acme", "nope") is None
    assert registry.count("acme") == 1 == len(registry.list("acme"))
    assert registry.count("globex") == 1 and registry.count("initech") == 0


def test_names_are_per_tenant(registry):
    registry.add("acme", "bot", D1, INFO, max_adapters=10)
    registry.add("globex", "bot", D2, INFO, max_adapters=10)
    with pytest.raises(Conflict):
        registry.add("acme", "bot", D3, INFO, max_adapters=10)
    assert registry.get("globex", "bot").digest == D2


def test_another_tenants_adapter_looks_exactly_like_a_missing_one(registry):
    registry.add("acme", "secret-bot", D1, INFO, max_adapters=10)
    with pytest.raises(NotFound) as theirs:
        registry.get("globex", "secret-bot")
    registry.delete("acme", "secret-bot")
    with pytest.raises(NotFound) as missing:
        registry.get("globex", "secret-bot")
    assert theirs.value.message == missing.value.message == "The model `secret-bot` does not exist."
    assert theirs.value.field == missing.value.field
    for write in (lambda: registry.delete("globex", "secret-bot"),
                  lambda: registry.set_pinned("globex", "secret-bot", True),
                  lambda: registry.replace("globex", "secret-bot", D2, INFO)):
        with pytest.raises(NotFound, match="^The model `secret-bot` does not exist.$"):
            write()


def test_adapter_quota(registry):
    for i in range(2):
        registry.add("acme", f"bot-{i}", D1, INFO, max_adapters=2)
    with pytest.raises(QuotaExceeded) as e:
        registry.add("acme", "bot-2", D1, INFO, max_adapters=2)
    assert e.value.retry_after is None and e.value.field == "name"
    registry.add("globex", "bot-2", D1, INFO, max_adapters=2)  # the other tenant's count is its own


def test_replace_bumps_version_and_keeps_pinned(registry):
    registry.add("acme", "bot", D1, INFO, max_adapters=10)
    registry.set_pinned("acme", "bot", True)
    new, old = registry.replace("acme", "bot", D2, INFO)
    assert (new.version, new.digest, new.pinned, new.status) == (2, D2, True, AdapterStatus.ACTIVE)
    assert (old.version, old.status) == (1, AdapterStatus.RETIRED)
    assert registry.get("acme", "bot") == new
    assert registry.retired() == [old] and registry.live_digests() == {D1, D2}
    registry.forget(old)  # drained
    assert registry.retired() == [] and registry.live_digests() == {D2}
    assert registry.replace("acme", "bot", D3, INFO)[0].key == "acme/bot@3"


def test_delete_returns_every_version(registry):
    registry.add("acme", "bot", D1, INFO, max_adapters=10)
    registry.replace("acme", "bot", D2, INFO)
    assert [r.version for r in registry.delete("acme", "bot")] == [1, 2]
    assert registry.live_digests() == set() and registry.list("acme") == []
    registry.add("acme", "bot", D3, INFO, max_adapters=10)  # the name is free again


def test_lists_show_active_versions_by_name(registry):
    for name in ("zeta", "alpha"):
        registry.add("acme", name, D1, INFO, max_adapters=10)
    registry.replace("acme", "zeta", D2, INFO)
    registry.add("globex", "mid", D1, INFO, max_adapters=10)
    assert [r.key for r in registry.list("acme")] == ["acme/alpha@1", "acme/zeta@2"]
    assert [r.key for r in registry.list_all()] == ["acme/alpha@1", "acme/zeta@2", "globex/mid@1"]


def test_generation_moves_on_writes_only(registry):
    g0 = registry.generation
    registry.add("acme", "bot", D1, INFO, max_adapters=10)
    g1 = registry.generation
    registry.get("acme", "bot")
    registry.snapshot()
    with pytest.raises(Conflict):
        registry.add("acme", "bot", D1, INFO, max_adapters=10)
    assert g1 > g0 and registry.generation == g1
    registry.set_pinned("acme", "bot", True)
    assert registry.generation > g1
    assert registry.snapshot()[("acme", "bot")].pinned


def test_unknown_tenant(registry):
    with pytest.raises(NotFound, match="tenant"):
        registry.add("initech", "bot", D1, INFO, max_adapters=10)


@pytest.mark.parametrize("name", ["a/b", "..", "a..b", "../etc", "a\x00b", "a\nb", "", "-x", ".x", "x" * 129])
def test_bad_names(name):
    with pytest.raises(InvalidArgument) as e:
        validate_name(name)
    assert e.value.field == "name" and "without '..'" in e.value.message


@pytest.mark.parametrize("name", ["bot", "Support-Bot_v2.1", "x" * 128])
def test_good_names(name):
    validate_name(name)


def test_quota_holds_under_concurrent_uploads(registry):
    from concurrent.futures import ThreadPoolExecutor

    def add(i):
        try:
            return registry.add("acme", f"bot-{i}", D1, INFO, max_adapters=3)
        except QuotaExceeded:
            return None

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(add, range(16)))
    assert sum(r is not None for r in results) == 3 and len(registry.list("acme")) == 3


def test_pins_are_bounded_per_tenant_and_for_all_tenants_together(registry):
    for tenant in ("acme", "globex"):
        for name, digest in (("a", D1), ("b", D2), ("c", D3)):
            registry.add(tenant, name, digest, INFO, max_adapters=10)
    registry.set_pinned("acme", "a", True, max_pinned=1)
    registry.set_pinned("acme", "a", True, max_pinned=1)  # pinning it again is not another pin
    with pytest.raises(QuotaExceeded, match="--max-pins-per-tenant"):
        registry.check_pin("acme", "b", max_pinned=1)  # the same check, before the adapter is loaded
    with pytest.raises(QuotaExceeded, match="--max-pins-per-tenant") as e:
        registry.set_pinned("acme", "b", True, max_pinned=1)
    assert e.value.field == "pin" and not registry.get("acme", "b").pinned
    room = (2, 3 * INFO.size_bytes)  # two pins in all
    registry.set_pinned("globex", "a", True, max_pinned=1, room=room)
    with pytest.raises(QuotaExceeded, match="--max-pinned-share"):
        registry.set_pinned("globex", "b", True, room=room)
    with pytest.raises(QuotaExceeded, match="--max-pinned-share"):
        registry.set_pinned("acme", "c", True, room=(5, 2.5 * INFO.size_bytes))  # room by bytes
    registry.set_pinned("acme", "a", False)
    registry.set_pinned("globex", "b", True, room=room)
    assert [r.name for r in registry.records() if r.pinned] == ["a", "b"]
