"""Tenants: keys shown once and stored hashed, revocation, quotas, the rate limiter."""

from __future__ import annotations

import pytest

from server.db import Database
from server.errors import Conflict, InvalidArgument, NotFound, RateLimited, Unauthenticated
from server.tenants import Authenticator, Principal, Quotas, RateLimiter, Role, TenantStore, hash_key


class CountingStore(TenantStore):
    """A real TenantStore that counts the authenticator's loads from the database."""

    lookups = 0

    def principals(self):
        self.lookups += 1
        return super().principals()


@pytest.fixture
def db(tmp_path):
    return Database(tmp_path / "registry.sqlite3")


@pytest.fixture
def store(db):
    return CountingStore(db)


def test_key_is_returned_once_and_only_its_hash_is_stored(db, store):
    key = store.create("acme")
    assert key.startswith("lpx_") and len(key) > 40
    on_disk = b"".join(p.read_bytes() for p in db.path.parent.iterdir() if p.name.startswith(db.path.name))
    assert key.encode() not in on_disk
    assert hash_key(key).encode() in on_disk
    [info] = store.list()
    assert (info.name, info.role, info.key_prefix, info.revoked) == ("acme", Role.TENANT, key[:8], False)


def test_authenticate_bearer_key(store):
    key = store.create("acme", quotas=Quotas(requests_per_minute=5))
    auth = Authenticator(store)
    p = auth.authenticate(f"Bearer {key}")
    assert p == Principal("acme", Role.TENANT, Quotas(requests_per_minute=5)) and not p.is_admin
    assert auth.authenticate(f"bearer  {key} ") == p


@pytest.mark.parametrize("header, message", [
    (None, "missing Authorization: Bearer <key> header"),
    ("", "missing Authorization: Bearer <key> header"),
    ("Bearer ", "missing Authorization: Bearer <key> header"),
    ("Basic dXNlcjpwYXNz", "Bearer"),
    ("Bearer lpx_not-a-key", "invalid API key"),
])
def test_bad_credentials_are_unauthenticated(store, header, message):
    store.create("acme")
    with pytest.raises(Unauthenticated) as e:
        Authenticator(store).authenticate(header)
    assert message in e.value.message


def test_hot_path_does_not_query_the_database(store):
    key = store.create("acme")
    auth = Authenticator(store)
    for _ in range(100):
        auth.authenticate(f"Bearer {key}")
    for _ in range(100):  # nor does a flood of bad keys
        with pytest.raises(Unauthenticated):
            auth.authenticate("Bearer lpx_not-a-key")
    assert store.lookups == 1


def test_revoked_key_stops_working_at_once(store):
    key = store.create("acme")
    auth = Authenticator(store)
    auth.authenticate(f"Bearer {key}")  # now cached
    store.revoke("acme")
    with pytest.raises(Unauthenticated, match="invalid API key"):
        auth.authenticate(f"Bearer {key}")
    assert store.get("acme").revoked
    with pytest.raises(NotFound):
        store.revoke("nobody")


def test_new_quotas_apply_to_the_next_request(store):
    key = store.create("acme")
    auth = Authenticator(store)
    assert auth.authenticate(f"Bearer {key}").quotas == Quotas()
    store.set_quotas("acme", Quotas(max_adapters=3, max_rank=16, requests_per_minute=10))
    assert auth.authenticate(f"Bearer {key}").quotas == Quotas(3, 16, 10)
    with pytest.raises(NotFound):
        store.set_quotas("nobody", Quotas())


def test_admin_role(store):
    key = store.create("ops", role=Role.ADMIN)
    assert Authenticator(store).authenticate(f"Bearer {key}").is_admin


@pytest.mark.parametrize("name", ["Acme", "-acme", "a/b", "a..b", "", "a" * 64, "acme\n"])
def test_bad_tenant_names(store, name):
    with pytest.raises(InvalidArgument) as e:
        store.create(name)
    assert e.value.field == "name"


def test_duplicate_tenant_is_a_conflict(store):
    store.create("acme")
    with pytest.raises(Conflict):
        store.create("acme")


@pytest.mark.parametrize("kwargs, field", [
    ({"max_rank": 12}, "max_rank"), ({"max_adapters": 0}, "max_adapters"), ({"requests_per_minute": -1},
                                                                          "requests_per_minute"),
])
def test_quotas_are_validated(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        Quotas(**kwargs)
    assert e.value.field == field


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_limiter_bursts_then_refills():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    acme = Principal("acme", Role.TENANT, Quotas(requests_per_minute=6))  # one token per 10 s
    for _ in range(6):
        limiter.take(acme)
    with pytest.raises(RateLimited) as e:
        limiter.take(acme)
    assert e.value.retry_after == 10.0
    clock.now += 4
    with pytest.raises(RateLimited) as e:
        limiter.take(acme)
    assert e.value.retry_after == 6.0
    clock.now += 6
    limiter.take(acme)  # one token refilled
    with pytest.raises(RateLimited):
        limiter.take(acme)


def test_retry_after_is_at_least_one_second():
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    busy = Principal("busy", Role.TENANT, Quotas(requests_per_minute=600))  # a token per 0.1 s
    for _ in range(600):
        limiter.take(busy)
    with pytest.raises(RateLimited) as e:
        limiter.take(busy)
    assert e.value.retry_after == 1.0


def test_tenants_are_limited_separately_and_admins_not_at_all():
    limiter = RateLimiter(clock=FakeClock())
    quotas = Quotas(requests_per_minute=1)
    limiter.take(Principal("a", Role.TENANT, quotas))
    limiter.take(Principal("b", Role.TENANT, quotas))
    with pytest.raises(RateLimited):
        limiter.take(Principal("a", Role.TENANT, quotas))
    for _ in range(100):
        limiter.take(Principal("ops", Role.ADMIN, quotas))
