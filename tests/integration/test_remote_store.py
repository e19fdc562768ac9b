"""The object-storage adapter store against a real S3 server (s3rver): content addressing, the
manifest written last, fetches verified against their digest, the bounded local cache, grace
periods, and a store that goes away."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from server.adapters.remote import RemoteStore
from server.adapters.store import digest_files
from server.errors import StoreUnavailable
from tests.adapter_files import adapter_files, lora_tensors
from tests.integration.services import S3, have_s3

pytestmark = pytest.mark.skipif(not have_s3() and not os.environ.get("CI"),
                                reason="s3rver is installed by scripts/install.sh")


@pytest.fixture(scope="module")
def s3():
    server = S3()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.close()


def stage(store: RemoteStore, files: dict[str, bytes]):
    cm = store.staging_dir()
    path = cm.__enter__()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return cm, path


def blob(i: int) -> dict[str, bytes]:
    return adapter_files(tensors=lora_tensors(seed=i), fingerprint=None)


def test_put_fetch_and_share_between_servers(s3, tmp_path):
    url = s3.url(f"t-{time.monotonic_ns()}")
    a = RemoteStore(url, tmp_path / "a", cache_bytes=1 << 30)
    b = RemoteStore(url, tmp_path / "b", cache_bytes=1 << 30)
    files = blob(1)
    digest = digest_files(files)
    cm, path = stage(a, files)
    got, local = a.put(path, digest=digest)
    cm.__exit__(None, None, None)
    assert got == digest and local == a.path(digest) and (local / "adapter_config.json").is_file()
    assert a.exists(digest) and a.intact(digest) and b.digests() == {digest}
    assert not b.path(digest).exists()
    fetched = asyncio.run(b.local(digest))  # B has never seen it: fetched and verified
    assert {f.name: f.read_bytes() for f in fetched.iterdir()} == files


def test_a_blob_changed_in_the_store_is_refused(s3, tmp_path):
    import obstore
    from obstore.store import from_url

    url = s3.url(f"t-{time.monotonic_ns()}")
    a = RemoteStore(url, tmp_path / "a", cache_bytes=1 << 30)
    files = blob(2)
    digest = digest_files(files)
    cm, path = stage(a, files)
    a.put(path, digest=digest)
    cm.__exit__(None, None, None)
    obstore.put(from_url(url), f"sha256/{digest}/adapter_config.json", b'{"r": 8}')  # tampered
    b = RemoteStore(url, tmp_path / "b", cache_bytes=1 << 30)
    with pytest.raises(StoreUnavailable, match="does not match its digest"):
        asyncio.run(b.local(digest))
    assert not b.path(digest).exists()


def test_the_cache_evicts_least_recently_used_but_never_what_is_in_use(s3, tmp_path):
    url = s3.url(f"t-{time.monotonic_ns()}")
    writer = RemoteStore(url, tmp_path / "w", cache_bytes=1 << 30)
    digests = []
    for i in range(3):
        files = blob(10 + i)
        cm, path = stage(writer, files)
        digests.append(writer.put(path, digest=digest_files(files))[0])
        cm.__exit__(None, None, None)
    size = writer.size_bytes(digests[0])
    in_use: set[str] = {digests[0]}
    reader = RemoteStore(url, tmp_path / "r", cache_bytes=2 * size + size // 2, in_use=lambda: in_use)
    for d in digests:
        asyncio.run(reader.local(d))
        time.sleep(0.02)
    # Room for two: the oldest (digests[0]) is in use, so the next oldest went.
    assert set(reader.cached()) == {digests[0], digests[2]}


def test_unreferenced_blobs_go_after_their_grace(s3, tmp_path):
    url = s3.url(f"t-{time.monotonic_ns()}")
    store = RemoteStore(url, tmp_path / "s", cache_bytes=1 << 30)
    keep, drop = blob(20), blob(21)
    for files in (keep, drop):
        cm, path = stage(store, files)
        store.put(path, digest=digest_files(files))
        cm.__exit__(None, None, None)
    live = {digest_files(keep)}
    assert store.gc(live, grace_s=60) == []  # just uploaded: within its grace
    assert store.gc(live, grace_s=0) == [digest_files(drop)]
    assert store.digests() == live


def test_touch_restarts_a_blobs_grace_for_every_servers_gc(s3, tmp_path):
    """A registration against a blob already stored (no bytes sent) touches it first, as a put of
    the same bytes would: another server's gc, which shares no lock with this one, sees it fresh."""
    url = s3.url(f"t-{time.monotonic_ns()}")
    store = RemoteStore(url, tmp_path / "s", cache_bytes=1 << 30)
    other = RemoteStore(url, tmp_path / "o", cache_bytes=1 << 30)
    files = blob(40)
    digest = digest_files(files)
    assert store.touch(digest) is False
    cm, path = stage(store, files)
    store.put(path, digest=digest)
    cm.__exit__(None, None, None)
    import obstore

    def stamp():  # what every server's gc reads the blob's age from
        return obstore.head(store._obj, f"sha256/{digest}.json")["last_modified"]

    before = stamp()
    time.sleep(1.1)  # S3's last-modified counts whole seconds
    assert store.touch(digest) is True
    assert stamp() > before
    assert other.gc(set(), grace_s=0) == [digest]
    assert store.touch(digest) is False


def test_a_store_that_does_not_answer_is_store_unavailable(s3, tmp_path):
    url = s3.url(f"t-{time.monotonic_ns()}")
    store = RemoteStore(url, tmp_path / "s", cache_bytes=1 << 30)
    files = blob(30)
    cm, path = stage(store, files)
    digest = store.put(path, digest=digest_files(files))[0]
    cm.__exit__(None, None, None)
    other = RemoteStore(url, tmp_path / "o", cache_bytes=1 << 30)
    s3.stop()
    try:
        assert asyncio.run(store.local(digest))  # cached: served without the store
        with pytest.raises(StoreUnavailable):
            asyncio.run(other.local(digest))
    finally:
        s3.start()
    assert asyncio.run(other.local(digest))
