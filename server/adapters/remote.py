"""Adapter blobs in object storage (``--store-url s3://bucket/prefix``), with a bounded local cache.

Several servers share one store. Blobs stay content-addressed, as on disk:

    <prefix>/sha256/<digest>/<file>     the adapter's files
    <prefix>/sha256/<digest>.json       its manifest (files and sizes), written last:
                                        a blob without one is incomplete and invisible
    <prefix>/released/<digest>          when the last version using it was deleted or retired

vLLM loads adapters from local files, so each server keeps the blobs it serves in
``<data-dir>/adapters/cache/<digest>/`` (``--blob-cache-bytes``, least recently used first
out, never one the engine may still read). A fetched blob is verified against its digest
before anything loads it. An upload is staged locally as before; :meth:`put` sends it to the
store and keeps the staged copy as the cache's.

A store that does not answer is :class:`~server.errors.StoreUnavailable` (503, Retry-After) for
what needs it -- a cold adapter not in the cache, an upload -- while loaded and cached adapters
keep serving.

The bucket, region, endpoint and credentials come from the usual ``AWS_*`` environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_ALLOW_HTTP`` for a plain-HTTP endpoint), read by obstore (``object_store``'s S3 client).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server.adapters.store import LocalStaging, digest_dir
from server.errors import StoreUnavailable

logger = logging.getLogger(__name__)


class RemoteStore(LocalStaging):
    shared = True

    def __init__(self, url: str, local_root: str | Path, *, cache_bytes: int,
                 in_use: Callable[[], set[str]] = set):
        from obstore.store import from_url

        super().__init__(local_root)
        self.url = url
        try:
            self._obj = from_url(url)
        except Exception as e:  # a malformed URL, an unknown scheme
            raise ValueError(f"--store-url {url!r}: {e}") from None
        self._cache = self.root / "cache"
        self._cache.mkdir(parents=True, exist_ok=True)
        self.cache_bytes = cache_bytes
        self.in_use = in_use
        """Digests the engine may still read (the residency manager's): never evicted from the cache."""
        self._fetches: dict[str, asyncio.Future] = {}

    # ---------------------------------------------------------------- the object store

    def _call(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise StoreUnavailable(f"the adapter store ({self.url}) did not answer {what}: {type(e).__name__}") from e

    def _manifest(self, digest: str) -> dict | None:
        import obstore

        try:
            data = self._call("a read", obstore.get, self._obj, f"sha256/{digest}.json").bytes()
        except FileNotFoundError:
            return None
        return json.loads(bytes(data))

    def put(self, staging_dir: Path, *, digest: str | None = None) -> tuple[str, Path]:
        """Send a staged adapter to the store (its manifest last) and keep the staged copy as the
        cache's; an identical blob already there is kept, its grace period restarted."""
        import obstore

        staging_dir = Path(staging_dir)
        digest = digest or digest_dir(staging_dir)
        files = {f.name: f.stat().st_size for f in staging_dir.iterdir() if f.is_file()}
        if self._manifest(digest) is None:
            for name in sorted(files):
                self._call("an upload", obstore.put, self._obj, f"sha256/{digest}/{name}", staging_dir / name)
            logger.info("stored adapter blob %s in %s", digest, self.url)
        else:
            logger.info("adapter blob %s already stored; reusing it", digest)
        manifest = json.dumps({"digest": digest, "files": files}).encode()
        self._call("an upload", obstore.put, self._obj, f"sha256/{digest}.json", manifest)  # complete, and fresh
        return digest, self._adopt(staging_dir, digest)

    def exists(self, digest: str) -> bool:
        return self._manifest(digest) is not None

    def touch(self, digest: str) -> bool:
        """Restart a stored blob's grace period for every server's gc, as :meth:`put` of the same
        bytes does (its manifest written again); False if it is not stored."""
        import obstore

        manifest = self._manifest(digest)
        if manifest is None:
            return False
        self._call("an upload", obstore.put, self._obj, f"sha256/{digest}.json", json.dumps(manifest).encode())
        return True

    def intact(self, digest: str) -> bool:
        import obstore

        manifest = self._manifest(digest)
        if manifest is None:
            return False
        listed = self._call("a listing", lambda: obstore.list(self._obj, prefix=f"sha256/{digest}/").collect())
        sizes = {m["path"].rsplit("/", 1)[-1]: m["size"] for m in listed}
        return all(sizes.get(name) == size for name, size in manifest["files"].items())

    def size_bytes(self, digest: str) -> int:
        manifest = self._manifest(digest)
        return sum(manifest["files"].values()) if manifest else 0

    def digests(self) -> set[str]:
        import obstore

        listed = self._call("a listing", obstore.list_with_delimiter, self._obj, prefix="sha256/")
        return {m["path"].rsplit("/", 1)[-1].removesuffix(".json") for m in listed["objects"]
                if m["path"].endswith(".json")}

    def release(self, digest: str) -> None:
        import obstore

        self._call("a write", obstore.put, self._obj, f"released/{digest}", b"")

    def delete(self, digest: str) -> bool:
        import obstore

        manifest = self._manifest(digest)
        if manifest is None:
            return False
        self._call("a delete", obstore.delete, self._obj, f"sha256/{digest}.json")  # invisible first
        paths = [f"sha256/{digest}/{name}" for name in manifest["files"]] + [f"released/{digest}"]
        for path in paths:
            try:
                self._call("a delete", obstore.delete, self._obj, path)
            except FileNotFoundError:
                pass
        if digest not in self.in_use():
            shutil.rmtree(self._cache / digest, ignore_errors=True)
        logger.info("deleted adapter blob %s from %s", digest, self.url)
        return True

    def gc(self, live_digests: set[str], *, grace_s: float = 60.0) -> list[str]:
        """Delete blobs no row refers to once their grace (from upload or release) has passed --
        any server may, all of them do -- and trim this server's cache."""
        import obstore

        now, removed = time.time(), []
        for digest in sorted(self.digests() - set(live_digests)):
            stamps = []
            for path in (f"sha256/{digest}.json", f"released/{digest}"):
                try:
                    stamps.append(self._call("a read", obstore.head, self._obj, path)["last_modified"].timestamp())
                except FileNotFoundError:
                    pass
            if stamps and now - max(stamps) >= grace_s and self.delete(digest):
                removed.append(digest)
        self.clean_staging()
        self._trim(keep=set(live_digests))
        return removed

    # ---------------------------------------------------------------- the local cache

    def path(self, digest: str) -> Path:
        """Where the cached copy is (or will be): what vLLM loads."""
        return self._cache / digest

    async def local(self, digest: str) -> Path:
        """The blob on local disk, fetched and verified first if it is not cached. Concurrent
        requests for one blob share one fetch."""
        path = self._cache / digest
        if path.is_dir():
            os.utime(path)  # recently used
            return path
        if digest not in self._fetches:
            self._fetches[digest] = asyncio.ensure_future(asyncio.to_thread(self._fetch, digest))
            self._fetches[digest].add_done_callback(lambda _: self._fetches.pop(digest, None))
        return await asyncio.shield(self._fetches[digest])

    def _fetch(self, digest: str) -> Path:
        import obstore

        manifest = self._manifest(digest)
        if manifest is None:
            raise StoreUnavailable(f"adapter blob {digest[:16]}... is not in the store ({self.url})")
        tmp = Path(tempfile.mkdtemp(prefix=f"fetch-{os.getpid()}-", dir=self._staging))
        try:
            for name in manifest["files"]:
                data = self._call("a read", obstore.get, self._obj, f"sha256/{digest}/{name}").bytes()
                (tmp / name).write_bytes(bytes(data))
            got = digest_dir(tmp)
            if got != digest:
                raise StoreUnavailable(f"adapter blob {digest[:16]}... fetched from {self.url} does not match its "
                                       f"digest (got {got[:16]}...); not loading it")
            final = self._adopt(tmp, digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._trim(keep={digest})
        logger.info("fetched adapter blob %s from %s", digest, self.url)
        return final

    def _adopt(self, staged: Path, digest: str) -> Path:
        final = self._cache / digest
        if not final.exists():
            try:
                os.rename(staged, final)
            except OSError:
                if not final.is_dir():
                    raise
        return final

    def cached(self) -> dict[str, int]:
        out = {}
        for d in self._cache.iterdir():
            if d.is_dir():
                out[d.name] = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        return out

    def _trim(self, *, keep: set[str] = frozenset()) -> None:
        """Evict least recently used cached blobs while over --blob-cache-bytes; never one the
        engine may still read or one just asked for."""
        sizes = self.cached()
        total = sum(sizes.values())
        if total <= self.cache_bytes:
            return
        protected = set(self.in_use()) | set(keep)
        for digest in sorted(sizes, key=lambda d: (self._cache / d).stat().st_mtime):
            if total <= self.cache_bytes:
                break
            if digest in protected:
                continue
            shutil.rmtree(self._cache / digest, ignore_errors=True)
            total -= sizes[digest]
            logger.info("evicted adapter blob %s from the local cache", digest)
