"""Adapter files on disk, content-addressed: ``<data_dir>/adapters/sha256/<digest>/``.

An upload is unpacked into a fresh directory under ``.staging/`` (same
filesystem), checked, and only then renamed into place, so a blob directory is
either complete or absent -- never half-written. The digest covers every file
(sha256 over the sorted ``name``/``sha256(bytes)`` pairs), so two tenants
uploading the same adapter share one copy, and the engine may cache by digest.

The registry (not this store) knows which blobs are referenced, and the
residency manager which ones the engine may still read; :meth:`gc` takes the
union and removes the rest once their grace period has passed. The grace period
runs from a blob's last use: its upload, or the delete or retirement of the
last version that referred to it (:meth:`release`).

A staging directory is named after the process that made it
(``upload-<pid>-...``), so a server starting after a crash removes the ones no
live process owns (:meth:`clean_staging`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def digest_dir(path: Path) -> str:
    """sha256 over ``name \\0 sha256(file) \\n`` for each regular file, sorted by name."""
    files = {}
    for f in (p for p in path.iterdir() if p.is_file()):
        inner = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                inner.update(chunk)
        files[f.name] = inner.hexdigest()
    return combine_digests(files)


def digest_files(files: dict[str, bytes]) -> str:
    """What :func:`digest_dir` gives for a directory holding exactly these files."""
    return combine_digests({name: hashlib.sha256(data).hexdigest() for name, data in files.items()})


def combine_digests(file_digests: dict[str, str]) -> str:
    outer = hashlib.sha256()
    for name in sorted(file_digests):
        outer.update(f"{name}\0{file_digests[name]}\n".encode())
    return outer.hexdigest()


class LocalStaging:
    """Uploads are staged on this server's disk whatever the store: ``<root>/.staging/``."""

    shared = False
    """Whether other servers share the store (then nothing is deleted without its grace)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        """Free space on the disk uploads are staged on."""
        return shutil.disk_usage(self._staging).free

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A fresh empty directory to unpack into; removed on exit unless :meth:`put` moved it."""
        path = Path(tempfile.mkdtemp(prefix=f"upload-{os.getpid()}-", dir=self._staging))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clean_staging(self) -> list[Path]:
        """Remove staging directories whose process is gone (a crash mid-upload); returns them."""
        removed = []
        for leftover in self._staging.iterdir():
            owner = _owner(leftover.name)
            if owner is not None and (owner == os.getpid() or _alive(owner)):
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
        return removed


class AdapterStore(LocalStaging):
    """The default store: blob directories on this server's disk, which vLLM reads in place."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._blobs = self.root / "sha256"
        self._blobs.mkdir(parents=True, exist_ok=True)

    async def local(self, digest: str) -> Path:
        """The blob's directory for vLLM to load (here it always is local)."""
        return self.path(digest)

    def put(self, staging_dir: Path, *, digest: str | None = None) -> tuple[str, Path]:
        """Move a staged adapter into the store; returns ``(digest, path)``. An identical blob
        already there is reused and the staged copy deleted. ``digest`` is the caller's
        :func:`digest_dir` of ``staging_dir``, if it computed one already (off the event loop)."""
        staging_dir = Path(staging_dir)
        if staging_dir.resolve().parent != self._staging.resolve():
            raise ValueError(f"{staging_dir} is not a staging directory of {self.root}")
        digest = digest or digest_dir(staging_dir)
        final = self._blobs / digest
        if not final.exists():
            _fsync_files(staging_dir)  # the blob must survive a crash once the registry points at it
            try:
                os.rename(staging_dir, final)  # atomic on one filesystem; fails if another put won the race
                _fsync_dir(self._blobs)
                logger.info("stored adapter blob %s", digest)
                return digest, final
            except OSError:
                if not final.is_dir():
                    raise
        shutil.rmtree(staging_dir, ignore_errors=True)
        os.utime(final)  # fresh again: gc's grace period protects it until the registry refers to it
        logger.info("adapter blob %s already stored; reusing it", digest)
        return digest, final

    def path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r}")
        return self._blobs / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_dir()

    def touch(self, digest: str) -> bool:
        """Restart a stored blob's grace period, as :meth:`put` of the same bytes would (a row is
        about to refer to it); False if it is not stored."""
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            return False
        return self.exists(digest)

    def release(self, digest: str) -> None:
        """The last version using this blob was deleted or retired: its grace period starts now."""
        try:
            os.utime(self.path(digest))
        except FileNotFoundError:
            pass

    def intact(self, digest: str) -> bool:
        """Whether the blob holds the two files every adapter has (the rename made it complete;
        this catches a hand-made deletion)."""
        path = self.path(digest)
        return all((path / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors"))

    def size_bytes(self, digest: str) -> int:
        return sum(f.stat().st_size for f in self.path(digest).iterdir() if f.is_file())

    def digests(self) -> set[str]:
        return {p.name for p in self._blobs.iterdir() if _DIGEST.fullmatch(p.name)}

    def delete(self, digest: str) -> bool:
        """Remove a blob; False if it was not there. The directory leaves ``sha256/`` in one rename."""
        path = self.path(digest)
        trash = self._staging / f"delete-{digest}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted adapter blob %s", digest)
        return True

    def gc(self, live_digests: set[str], *, grace_s: float = 60.0) -> list[str]:
        """Delete blobs not in ``live_digests`` whose grace period (from their last put or
        :meth:`release`) has passed, and staging directories no live process owns.
        Returns the deleted digests."""
        now = time.time()
        removed = []
        for digest in sorted(self.digests() - set(live_digests)):
            if _age(self.path(digest), now) >= grace_s and self.delete(digest):
                removed.append(digest)
        self.clean_staging()
        return removed


def _owner(name: str) -> int | None:
    """``upload-<pid>-xxxx``, ``fetch-<pid>-xxxx`` and ``delete-<digest>-<pid>-<ns>`` -> pid; None for
    anything else."""
    parts = name.split("-")
    try:
        if parts[0] in ("upload", "fetch"):
            return int(parts[1])
        if parts[0] == "delete":
            return int(parts[2])
    except (IndexError, ValueError):
        pass
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile
        return -1.0

def _fsync_files(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
