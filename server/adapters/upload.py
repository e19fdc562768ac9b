"""An upload, turned into a checked adapter in the store -- or refused with nothing kept.

Three steps, each refusing with :class:`AdapterRejected` naming the file or field at fault:

1. :func:`unpack` writes the upload (loose files or a tar.gz) into a staging
   directory. Only ``adapter_config.json``, ``adapter_model.safetensors`` and
   ``loraplex.json`` are taken; a pickle (``.bin``, ``.pt`` ...) is refused
   outright, since loading one runs arbitrary code. Tar members must be regular
   files at the top level or under one directory: no links, devices, absolute
   paths or ``..``.
2. :func:`validate` applies the shared rule book (``compat``) to the config,
   checks the manifest's base fingerprint, and reads the safetensors header
   itself: the data region must be complete, and every tensor must be a
   ``lora_A`` [r, in] / ``lora_B`` [out, r] of a layer and linear this base
   has. A wrong shape means the adapter was made for another base; vLLM would
   fail on it at load time, or worse, serve it.
3. :meth:`AdapterStore.put` renames the staging directory into the store.

:func:`ingest` runs the three inside ``AdapterStore.staging_dir()``, which
removes the staging directory whatever happens. It is blocking file work: call
it from a worker thread.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from server.adapters.compat import IncompatibleAdapter, check_adapter_config, ensure_same_base
from server.adapters.store import AdapterStore
from server.errors import AdapterRejected

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "loraplex.json"
ALLOWED = (CONFIG, WEIGHTS, MANIFEST)
IGNORED = frozenset({"README.md", "metrics.jsonl"})  # what PEFT and the trainer write beside an adapter
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_UPLOAD_BYTES = 2 << 30
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class BaseSpec:
    """What an adapter must fit: the served base's architecture, fingerprint and linear shapes."""

    name: str
    architecture: str
    fingerprint: str
    num_layers: int
    linear_shapes: dict[str, tuple[int, int]]
    """PEFT module suffix -> (in_features, out_features), e.g. ``q_proj`` -> (hidden, heads * head_dim)."""

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any], fingerprint: str) -> BaseSpec:
        from trainer.plan import Shape

        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError(f"config of base {name!r} names no architecture")
        shape = Shape.from_config(dict(config))
        return cls(name, architectures[0], fingerprint, shape.layers, shape.linears())


@dataclass(frozen=True)
class UploadFile:
    filename: str
    data: bytes


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    """Highest rank among the adapter's tensors: the vLLM slot size it needs."""
    target_modules: list[str] = field(default_factory=list)
    """Linear layers the adapter's tensors actually cover, sorted."""
    size_bytes: int = 0
    base_fingerprint: str | None = None
    """The base the adapter records it was trained on (loraplex.json), if it says."""
    has_manifest: bool = False


@dataclass(frozen=True)
class StoredAdapter:
    digest: str
    path: Path
    info: AdapterInfo


def ingest(store: AdapterStore, base: BaseSpec, *, files: list[UploadFile] | None = None,
           tarball: bytes | None = None, max_rank: int, max_bytes: int = MAX_UPLOAD_BYTES) -> StoredAdapter:
    """unpack -> validate -> put. On any error the staging directory is gone and the store unchanged."""
    with store.staging_dir() as staging:
        unpack(files, tarball, staging, max_bytes=max_bytes)
        info = validate(staging, base, max_rank=max_rank)
        digest, path = store.put(staging)
    return StoredAdapter(digest, path, info)


# --- 1. unpack ---------------------------------------------------------------------------------

def unpack(files: list[UploadFile] | None, tarball: bytes | None, dest: Path, *,
           max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Write an upload's adapter files into ``dest`` (an empty directory)."""
    if (files is None) == (tarball is None):
        raise AdapterRejected("send the adapter either as files or as one tar.gz, not both or neither",
                              field="files")
    if files is not None:
        written = _unpack_files(files, dest, max_bytes)
    else:
        written = _unpack_tarball(tarball, dest, max_bytes)
    _require(written)


def accepted_files(files: list[UploadFile], *, max_bytes: int = MAX_UPLOAD_BYTES) -> dict[str, bytes]:
    """The files :func:`unpack` would write, by name, under the same rules, writing nothing:
    lets an upload of bytes already in the store skip the copy."""
    if sum(len(f.data) for f in files) > max_bytes:
        raise AdapterRejected(f"the upload is larger than {max_bytes} bytes", field="files")
    kept: dict[str, bytes] = {}
    for f in files:
        if _accept(f.filename):
            if f.filename in kept:
                raise AdapterRejected(f"{f.filename!r} appears twice in the upload", field="files")
            kept[f.filename] = f.data
    _require(set(kept))
    return kept


def _require(written: set[str]) -> None:
    if missing := [n for n in (CONFIG, WEIGHTS) if n not in written]:
        raise AdapterRejected(f"the upload has no {' and no '.join(missing)}; an adapter needs {CONFIG} and "
                              f"{WEIGHTS} (what PEFT's save_pretrained writes)", field="files")


def _unpack_files(files: list[UploadFile], dest: Path, max_bytes: int) -> set[str]:
    if sum(len(f.data) for f in files) > max_bytes:
        raise AdapterRejected(f"the upload is larger than {max_bytes} bytes", field="files")
    written: set[str] = set()
    for f in files:
        if _accept(f.filename):
            _write(dest, f.filename, io.BytesIO(f.data), written)
    return written


def _unpack_tarball(data: bytes, dest: Path, max_bytes: int) -> set[str]:
    written: set[str] = set()
    folders: set[tuple[str, ...]] = set()
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:  # lazily: the size cap stops a bomb before it is all read
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
                    raise AdapterRejected(f"the archive unpacks to more than {max_bytes} bytes", field="files")
                if _accept(parts[-1]):
                    _write(dest, parts[-1], tar.extractfile(member), written)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile):
        raise AdapterRejected("not a readable tar.gz archive (corrupted, truncated or another format)",
                              field="files") from None
    return written


def _member_parts(name: str) -> list[str]:
    """``./adapter/x.json`` -> ``["adapter", "x.json"]``; refuses absolute and ``..`` paths."""
    if name.startswith("/") or "\\" in name or ".." in name or _has_control(name):
        raise AdapterRejected(f"tar member {name!r} has an unsafe path (absolute, '..', backslash or "
                              "control characters)", field="files")
    return [p for p in name.split("/") if p not in ("", ".")]


def _accept(name: str) -> bool:
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


def _write(dest: Path, name: str, src: IO[bytes] | None, written: set[str]) -> None:
    if name in written:
        raise AdapterRejected(f"{name!r} appears twice in the upload", field="files")
    with open(dest / name, "xb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())  # the blob must survive a crash once the registry points at it
    written.add(name)


# --- 2. validate -------------------------------------------------------------------------------

def validate(dest: Path, base: BaseSpec, *, max_rank: int) -> AdapterInfo:
    """Check an unpacked adapter against the served base; returns what the registry records."""
    config = _read_json(dest / CONFIG)
    if violations := check_adapter_config(config, architecture=base.architecture, max_rank=max_rank):
        raise AdapterRejected(f"{CONFIG} is not servable: " + "; ".join(map(str, violations)),
                              field=violations[0].field)
    fingerprint = None
    if has_manifest := (dest / MANIFEST).is_file():
        fingerprint = _manifest_fingerprint(_read_json(dest / MANIFEST))
        try:
            ensure_same_base(fingerprint, base.fingerprint)
        except IncompatibleAdapter as e:
            raise AdapterRejected(f"{MANIFEST}: {e.violations[0].message}; this server serves {base.name}, "
                                  "the adapter was made for another base", field="base_fingerprint") from None
    shapes = _tensor_shapes(dest / WEIGHTS)
    ranks, targets = _check_tensors(shapes, config, base)
    return AdapterInfo(
        rank=max(ranks), target_modules=sorted(targets),
        size_bytes=sum(f.stat().st_size for f in dest.iterdir() if f.is_file()),
        base_fingerprint=fingerprint, has_manifest=has_manifest,
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterRejected(f"{path.name} is not valid JSON: {e}", field=path.name) from None
    if not isinstance(value, dict):
        raise AdapterRejected(f"{path.name} must hold a JSON object", field=path.name)
    return value


def _manifest_fingerprint(manifest: dict) -> str | None:
    base = manifest.get("base")
    fingerprint = base.get("fingerprint") if isinstance(base, dict) else None
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise AdapterRejected(f"{MANIFEST}: base.fingerprint must be a string", field="base_fingerprint")
    return fingerprint


def _corrupted(why: str) -> AdapterRejected:
    return AdapterRejected(f"corrupted or truncated safetensors: {why}", field=WEIGHTS)


def read_safetensors_header(path: Path) -> dict:
    """The JSON header, after checking that the file is exactly as long as the header says.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the data;
    each tensor's ``data_offsets`` [begin, end) index into the data."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupted(f"{size} bytes is too short to hold a header")
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _corrupted(f"the header claims {n} bytes, more than the {size}-byte file holds")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupted(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupted("the header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _corrupted(f"tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if size != 8 + n + end:
        raise _corrupted(f"the file is {size} bytes but its header describes {8 + n + end}")
    return header


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    read_safetensors_header(path)
    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # the library's own parse errors have no common public type
        raise _corrupted(str(e)) from None


def _parse_key(key: str) -> tuple[str, int, str, str] | None:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    -> (``model.layers.3.self_attn.q_proj``, 3, ``q_proj``, ``A``)."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
    if m is None:
        return None
    module, ab = m.groups()
    parts = module.split(".")
    if "layers" not in parts[:-2]:
        return None
    index = parts[parts.index("layers") + 1]
    if not (index.isascii() and index.isdigit()):
        return None
    return module, int(index), parts[-1], ab


def _rank_for(module: str, config: Mapping[str, Any]) -> int:
    """The rank PEFT gave this module: the first ``rank_pattern`` key matching it, else ``r``."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        try:
            if module == pattern or re.match(rf"(.*\.)?({pattern})$", module):
                return rank
        except re.error as e:
            raise AdapterRejected(f"rank_pattern key {pattern!r} is not a valid regex: {e}",
                                  field="rank_pattern") from None
    return config["r"]


def _check_tensors(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any],
                   base: BaseSpec) -> tuple[set[int], set[str]]:
    """Every tensor is a lora_A/lora_B this base has a slot for, in this base's shapes; returns (ranks, targets)."""
    if not shapes:
        raise AdapterRejected(f"{WEIGHTS} holds no tensors", field=WEIGHTS)
    other_base = f"the adapter was made for another base than {base.name}"
    ranks, targets, halves = set(), set(), {}
    for key, shape in sorted(shapes.items()):
        parsed = _parse_key(key)
        if parsed is None:
            raise AdapterRejected(f"tensor {key!r} is not a LoRA weight (expected "
                                  "'...layers.<i>.<module>.lora_A.weight' or '.lora_B.weight')", field=WEIGHTS)
        module, layer, linear, ab = parsed
        if layer >= base.num_layers:
            raise AdapterRejected(f"tensor {key!r} is for layer {layer}, but {base.name} has {base.num_layers} "
                                  f"layers: {other_base}", field=WEIGHTS)
        if linear not in base.linear_shapes:
            raise AdapterRejected(f"tensor {key!r} targets {linear!r}, which {base.name} has no LoRA slot for",
                                  field=WEIGHTS)
        r = _rank_for(module, config)
        in_features, out_features = base.linear_shapes[linear]
        expected = (r, in_features) if ab == "A" else (out_features, r)  # A: [r, in], B: [out, r]
        if shape != expected:
            raise AdapterRejected(f"tensor {key!r} has shape {list(shape)}, but {base.name} needs {list(expected)} "
                                  f"(rank {r}): {other_base}", field=WEIGHTS)
        halves.setdefault(module, set()).add(ab)
        ranks.add(r)
        targets.add(linear)
    if lonely := sorted(m for m, h in halves.items() if h != {"A", "B"}):
        raise AdapterRejected(f"{lonely[0]} has only one of lora_A/lora_B", field=WEIGHTS)
    return ranks, targets
