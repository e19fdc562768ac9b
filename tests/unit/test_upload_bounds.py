"""Uploads are bounded before a byte is read: how many stage at once, per tenant and per server,
and the disk space they may fill (the disk a SQLite registry writes to)."""

from __future__ import annotations

import asyncio
import types
from contextlib import AsyncExitStack

import pytest

from server.adapters.service import AdapterService
from server.adapters.store import AdapterStore
from server.config import Settings
from server.errors import ConcurrencyExceeded, StagingFull
from server.tenants.store import Principal, Role


def service(tmp_path, **settings) -> AdapterService:
    s = Settings(data_dir=tmp_path, **settings)
    return AdapterService(s, base_spec=None, engine=None, tenants=None, registry=None,
                          store=AdapterStore(tmp_path / "adapters"), residency=types.SimpleNamespace(),
                          namespace=None)


def staged_dirs(tmp_path) -> list:
    return [p for p in (tmp_path / "adapters" / ".staging").iterdir() if p.name.startswith("upload-")]


alice, bob, carol = (Principal(t, Role.TENANT) for t in ("alice", "bob", "carol"))
admin = Principal("ops", Role.ADMIN)


def test_uploads_at_once_are_bounded_per_tenant_and_per_server(tmp_path):
    svc = service(tmp_path, max_uploads=3, max_uploads_per_tenant=1, max_upload_bytes=1 << 20)

    async def run():
        async with AsyncExitStack() as held:
            await held.enter_async_context(svc.staging(alice))
            with pytest.raises(ConcurrencyExceeded, match="--max-uploads-per-tenant") as e:
                await held.enter_async_context(svc.staging(alice))
            assert e.value.field == "files" and e.value.retry_after
            await held.enter_async_context(svc.staging(bob))
            await held.enter_async_context(svc.staging(admin))  # not held to a tenant's count
            with pytest.raises(ConcurrencyExceeded, match="--max-uploads"):
                await held.enter_async_context(svc.staging(carol))
            assert len(staged_dirs(tmp_path)) == 3  # the refused ones staged nothing
        assert staged_dirs(tmp_path) == []
        async with svc.staging(carol), svc.staging(alice):  # each ended upload gives its place back
            pass

    asyncio.run(run())


def test_an_upload_the_disk_cannot_hold_is_refused_before_it_stages(tmp_path):
    free = AdapterStore(tmp_path / "adapters").free_bytes()
    svc = service(tmp_path, max_upload_bytes=free // 4, staging_reserve_bytes=free // 4)

    async def run():
        # each upload holds twice --max-upload-bytes (an archive, and what it unpacks to)
        async with svc.staging(alice):  # half the disk held for it, a quarter still free
            with pytest.raises(StagingFull, match="--max-upload-bytes") as e:
                async with svc.staging(bob):
                    pass
            assert e.value.retry_after
            async with svc.staging(bob, reserve=1 << 20):  # a copy of known size (--lora-modules) fits
                pass
        async with svc.staging(bob):  # room again once the first upload ended
            pass

    asyncio.run(run())
