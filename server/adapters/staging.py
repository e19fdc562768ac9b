"""An upload, written into a staging directory as it arrives, and hashed as it is written.

Both fronts feed :class:`StagedUpload` chunk by chunk (HTTP multipart parts,
gRPC stream messages), so an upload of any size holds one chunk in memory, and
a refused one stops at the chunk that broke a rule. The caps are checked as
bytes arrive: the whole upload (``--max-upload-bytes``), the archive's
unpacked size, its member count.

Rules for what may be uploaded:

- Only ``adapter_config.json``, ``adapter_model.safetensors`` and
  ``loraplex.json`` are kept; ``README.md`` and ``metrics.jsonl`` (what PEFT
  and the trainer write beside an adapter) are skipped. A pickle (``.bin``,
  ``.pt`` ...) is refused outright, since loading one runs arbitrary code.
- File names are plain names: no paths, ``..``, backslashes or control
  characters.
- A tar.gz holds regular files only, at its top level or under one
  directory: no links, devices, absolute paths or ``..``.

The staging directory lives in the store's ``.staging/`` (same filesystem, so
the store can rename it into place); the caller removes it whatever happens
(``AdapterStore.staging_dir``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from server import failpoints
from server.adapters.store import combine_digests
from server.errors import AdapterRejected, PayloadTooLarge

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "loraplex.json"
ALLOWED = (CONFIG, WEIGHTS, MANIFEST)
IGNORED = frozenset({"README.md", "metrics.jsonl"})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_UPLOAD_BYTES = 2 << 30
MAX_ARCHIVE_MEMBERS = 64
_ARCHIVE = ".upload.tar.gz"  # the raw archive inside the staging dir, removed once unpacked


class _File:
    __slots__ = ("fh", "sha")

    def __init__(self, path: Path | None):
        self.fh: BinaryIO | None = None if path is None else open(path, "xb")
        self.sha = hashlib.sha256()


class StagedUpload:
    """One upload: loose files or one tar.gz, written into ``directory`` (empty) as chunks arrive.

    Chunks of different files may interleave (gRPC allows it). :meth:`finish` closes
    everything, unpacks an archive, checks the two required files are there, and returns the
    adapter's digest (:func:`~server.adapters.store.digest_dir` of the directory).

    ``directory=None`` writes nothing: the same rules and the same digest, for knowing whether
    content is already stored before copying it (files only, not an archive)."""

    def __init__(self, directory: Path | None, *, max_bytes: int = MAX_UPLOAD_BYTES):
        self.dir = directory
        self.max_bytes = max_bytes
        self.received = 0
        self._open: dict[str, _File | None] = {}  # None: a skipped file (README.md ...)
        self._archive: _File | None = None
        self._digests: dict[str, str] = {}

    # ---------------------------------------------------------------- feeding

    def write_file(self, filename: str, chunk: bytes) -> None:
        """Append ``chunk`` to the upload's file ``filename`` (opened by its first chunk)."""
        if self._archive is not None:
            raise AdapterRejected("send the adapter either as files or as one tar.gz, not both", field="files")
        if filename not in self._open:
            if filename in self._digests:
                raise AdapterRejected(f"{filename!r} appears twice in the upload", field="files")
            path = None if self.dir is None else self.dir / filename
            self._open[filename] = _File(path) if accept(filename) else None
        self._count(len(chunk))
        if (f := self._open[filename]) is not None:
            if f.fh is not None:
                f.fh.write(chunk)
            f.sha.update(chunk)
        if chunk:
            failpoints.hit("upload.body")

    def end_file(self, filename: str) -> None:
        """No more chunks for ``filename`` (a multipart part ended); a later part of the same
        name is a duplicate."""
        f = self._open.pop(filename, None)
        if f is not None:
            if f.fh is not None:
                f.fh.close()
            self._digests[filename] = f.sha.hexdigest()
        else:
            self._digests.setdefault(filename, "")  # skipped, but seen

    def write_archive(self, chunk: bytes) -> None:
        if self._open or any(self._digests.values()):
            raise AdapterRejected("send the adapter either as files or as one tar.gz, not both", field="archive")
        if self.dir is None:
            raise ValueError("an archive is unpacked on disk: give StagedUpload a directory")
        if self._archive is None:
            self._archive = _File(self.dir / _ARCHIVE)
        self._count(len(chunk))
        self._archive.fh.write(chunk)
        failpoints.hit("upload.body")

    def _count(self, n: int) -> None:
        self.received += n
        if self.received > self.max_bytes:
            raise PayloadTooLarge(f"the upload is larger than {self.max_bytes} bytes (--max-upload-bytes)",
                                  field="files")

    # ---------------------------------------------------------------- finishing

    def finish(self) -> str:
        """Blocking file work (unpacking, hashing what is left): call it from a worker thread."""
        for name in list(self._open):
            self.end_file(name)
        if self._archive is not None:
            self._archive.fh.close()
            self._digests = _unpack_archive(self.dir / _ARCHIVE, self.dir, self.max_bytes)
            (self.dir / _ARCHIVE).unlink()
        kept = {n: d for n, d in self._digests.items() if d}
        if missing := [n for n in (CONFIG, WEIGHTS) if n not in kept]:
            raise AdapterRejected(f"the upload has no {' and no '.join(missing)}; an adapter needs {CONFIG} and "
                                  f"{WEIGHTS} (what PEFT's save_pretrained writes)", field="files")
        return combine_digests(kept)

    def abort(self) -> None:
        for f in [*self._open.values(), self._archive]:
            if f is not None and f.fh is not None:
                f.fh.close()
        self._open.clear()


def accept(name: str) -> bool:
    """True to keep the file, False to skip it; AdapterRejected if it may not be uploaded at all."""
    if (not name or "/" in name or "\\" in name or ".." in name or _has_control(name)
            or os.path.isabs(name)):
        raise AdapterRejected(f"file name {name!r} is not allowed: plain file names only "
                              "(no paths, '..', backslashes or control characters)", field="files")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise AdapterRejected(f"{name!r} is a pickle file, and loraplex never loads pickles (loading one runs "
                              "arbitrary code); save the adapter as safetensors "
                              "(save_pretrained(..., safe_serialization=True))", field="files")
    if name in IGNORED:
        return False
    if name not in ALLOWED:
        raise AdapterRejected(f"unexpected file {name!r}; an adapter upload holds only {', '.join(ALLOWED)}",
                              field="files")
    return True


def _has_control(name: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in name)


def _member_parts(name: str) -> list[str]:
    """``./adapter/x.json`` -> ``["adapter", "x.json"]``; refuses absolute and ``..`` paths."""
    if name.startswith("/") or "\\" in name or ".." in name or _has_control(name):
        raise AdapterRejected(f"tar member {name!r} has an unsafe path (absolute, '..', backslash or "
                              "control characters)", field="files")
    return [p for p in name.split("/") if p not in ("", ".")]


MAX_TAR_HEADER_BYTES = 64 << 10
"""Largest GNU long-name or pax extended header: ``tarfile`` reads one whole into memory, and a
1 MB upload can declare a 4 GB one."""


class _TarInfo(tarfile.TarInfo):
    """Refuses an oversized extended header before ``tarfile`` reads it into memory."""

    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise AdapterRejected(f"tar member {self.name!r} has a {self.size}-byte extended header; at most "
                                  f"{MAX_TAR_HEADER_BYTES} bytes are read", field="files")
        return super()._proc_member(tarfile_)


_EXTENDED_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)


def _check_stream(archive: Path, max_bytes: int) -> None:
    """Decompress the whole archive once, counting: refuses one that unpacks to more than
    ``max_bytes`` (headers and padding included) or whose stream is cut short (a gzip without its
    trailer reads fine up to the last member, so tarfile alone would accept it)."""
    import bz2
    import lzma

    with open(archive, "rb") as f:
        magic = f.read(6)
    opener = (gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic[:3] == b"BZh"
              else lzma.open if magic[:6] == b"\xfd7zXZ\x00" else open)
    total = 0
    try:
        with opener(archive, "rb") as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
                if total > max_bytes + (1 << 20):  # tar's own headers and padding on top of the files
                    raise PayloadTooLarge(f"the archive unpacks to more than {max_bytes} bytes", field="files")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise AdapterRejected(f"not a readable tar.gz archive ({e})", field="files") from None


def _unpack_archive(archive: Path, dest: Path, max_bytes: int) -> dict[str, str]:
    """The archive's adapter files into ``dest``; returns their sha256 by name."""
    _check_stream(archive, max_bytes)
    digests: dict[str, str] = {}
    folders: set[tuple[str, ...]] = set()
    total = members = 0
    try:
        with tarfile.open(archive, mode="r:*", tarinfo=_TarInfo) as tar:
            for member in tar:  # lazily: the caps stop a bomb before it is all read
                members += 1
                if members > MAX_ARCHIVE_MEMBERS:
                    raise AdapterRejected(f"the archive holds more than {MAX_ARCHIVE_MEMBERS} members; an adapter "
                                          "is 2 or 3 files", field="files")
                parts = _member_parts(member.name)
                if member.isdir() or not parts:
                    continue
                if not member.isreg():
                    raise AdapterRejected(f"tar member {member.name!r} is a link or special file; "
                                          "the archive may hold regular files only", field="files")
                folders.add(tuple(parts[:-1]))
                if len(parts) > 2 or len(folders) > 1:
                    raise AdapterRejected("put the adapter files at the top of the archive or in one folder; "
                                          f"found {member.name!r}", field="files")
                total += member.size
                if total > max_bytes:
                    raise PayloadTooLarge(f"the archive unpacks to more than {max_bytes} bytes", field="files")
                name = parts[-1]
                if name in digests:
                    raise AdapterRejected(f"{name!r} appears twice in the upload", field="files")
                if accept(name):
                    digests[name] = _copy(tar.extractfile(member), dest / name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile):
        raise AdapterRejected("not a readable tar.gz archive (corrupted, truncated or another format)",
                              field="files") from None
    return digests


def _copy(src: BinaryIO, path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "xb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            sha.update(chunk)
    return sha.hexdigest()


def copy_dir(src: Path, staged: StagedUpload, *, chunk: int = 1 << 20) -> None:
    """Feed a server-side adapter directory through the same rules as an upload, chunk by chunk.
    Only the adapter's own files are read: a training directory's checkpoints, optimizer state
    and logs beside them are left alone, unopened."""
    for f in sorted(src.iterdir()):
        if f.name not in ALLOWED or not f.is_file():
            continue
        with f.open("rb") as fh:
            staged.write_file(f.name, b"")
            while data := fh.read(chunk):
                staged.write_file(f.name, data)
        staged.end_file(f.name)

