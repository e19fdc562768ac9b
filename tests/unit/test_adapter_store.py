"""The content-addressed store: atomic puts, dedupe, deletes, garbage collection."""

from __future__ import annotations

import pytest

from server.adapters.store import AdapterStore


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "adapters")


def staged_leftovers(store):
    return list((store.root / ".staging").iterdir())


def test_put_moves_the_staged_dir_under_its_digest(store):
    with store.staging_dir() as path:
        (path / "a.json").write_bytes(b"{}")
        (path / "w.safetensors").write_bytes(b"123")
        digest, final = store.put(path)
    assert final == store.path(digest) == store.root / "sha256" / digest
    assert {p.name for p in final.iterdir()} == {"a.json", "w.safetensors"}
    assert not path.exists() and staged_leftovers(store) == []
    assert store.exists(digest) and store.size_bytes(digest) == 5


def test_identical_content_is_stored_once(store):
    digests = set()
    for _ in range(2):
        with store.staging_dir() as path:
            (path / "a.json").write_bytes(b"{}")
            digests.add(store.put(path)[0])
    assert len(digests) == 1 and store.digests() == digests
    assert staged_leftovers(store) == []


def test_digest_covers_names_and_contents(store):
    def digest(files):
        with store.staging_dir() as path:
            for n, d in files.items():
                (path / n).write_bytes(d)
            return store.put(path)[0]

    base = digest({"a": b"1", "b": b"2"})
    assert digest({"a": b"1", "b": b"3"}) != base
    assert digest({"a": b"1", "c": b"2"}) != base
    assert len(store.digests()) == 3


def test_staging_dir_is_removed_on_error(store):
    with pytest.raises(RuntimeError):
        with store.staging_dir() as path:
            (path / "a.json").write_bytes(b"{}")
            raise RuntimeError("validation failed")
    assert staged_leftovers(store) == [] and store.digests() == set()


def test_put_refuses_a_dir_outside_staging(store, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError):
        store.put(tmp_path / "elsewhere")


def test_delete_and_bad_digests(store):
    with store.staging_dir() as path:
        (path / "a").write_bytes(b"x")
        digest, _ = store.put(path)
    assert store.delete(digest) and not store.exists(digest)
    assert not store.delete(digest)
    with pytest.raises(ValueError):
        store.path("../../etc")


def test_gc_removes_only_unreferenced_blobs(store):
    digests = []
    for data in (b"live", b"dead"):
        with store.staging_dir() as path:
            (path / "a").write_bytes(data)
            digests.append(store.put(path)[0])
    live, dead = digests
    assert store.gc({live}) == []  # both are fresh: an upload may be about to register them
    assert store.gc({live}, grace_s=0) == [dead]
    assert store.digests() == {live}


def _blob(store, data: bytes) -> str:
    with store.staging_dir() as path:
        (path / "a").write_bytes(data)
        return store.put(path)[0]


def test_the_grace_period_runs_from_release_not_from_upload(store):
    import os
    import time

    old = _blob(store, b"uploaded long ago")
    past = time.time() - 3600
    os.utime(store.path(old), (past, past))
    assert store.gc(set(), grace_s=60) == [old]  # unreferenced for an hour: gone
    kept = _blob(store, b"deleted just now")
    os.utime(store.path(kept), (past, past))
    store.release(kept)  # the delete that let go of it happened now
    assert store.gc(set(), grace_s=60) == []
    assert store.gc(set(), grace_s=0) == [kept]


def test_clean_staging_removes_what_dead_processes_left_and_keeps_live_uploads(store):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    root = store.root / ".staging"
    (root / f"upload-{dead}-abcd").mkdir()
    (root / f"upload-{dead}-abcd" / "adapter_model.safetensors").write_bytes(b"half")
    (root / "upload-legacy").mkdir()  # an older server's name: no owner
    with store.staging_dir() as mine:  # this process's upload in progress
        removed = {p.name for p in store.clean_staging()}
        assert removed == {f"upload-{dead}-abcd", "upload-legacy"}
        assert mine.exists()
    assert staged_leftovers(store) == []
