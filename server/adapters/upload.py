"""An upload, turned into a checked adapter -- or refused, naming the file or field at fault.

1. :class:`~server.adapters.staging.StagedUpload` writes the upload into a
   staging directory as it arrives (loose files or a tar.gz), hashing it.
2. :func:`validate` applies the shared rule book (``compat``) to the config,
   checks the manifest's base fingerprint, and reads the safetensors header
   itself: the data region must be complete, every tensor a floating-point
   ``lora_A`` [r, in] / ``lora_B`` [out, r] of a layer and linear this base has,
   and every value finite. A wrong shape means the adapter was made for
   another base; vLLM would fail on it at load time, or worse, serve it.
3. The adapter service then has vLLM itself load the staged adapter
   (``add_lora``, which returns vLLM's refusal to the caller instead of
   failing inside an engine step), and only then stores and registers it.

:func:`unpack` runs step 1 on in-memory files, for tests and tools. All of it is blocking file work: call it
from a worker thread.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.adapters.compat import LINEAR_PARENTS, IncompatibleAdapter, check_adapter_config, ensure_same_base
from server.adapters.staging import CONFIG, MANIFEST, MAX_UPLOAD_BYTES, WEIGHTS, StagedUpload
from server.errors import AdapterRejected

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
# What vLLM casts to its LoRA dtype as it loads. Integer, boolean and float8 tensors would be
# cast too -- silently, into nonsense weights -- so they are refused.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


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


# --- 1. unpack (in-memory uploads: tests and tools) --------------------------------------------

def unpack(files: list[UploadFile] | None, tarball: bytes | None, dest: Path, *,
           max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """Write an upload's adapter files into ``dest`` (an empty directory); returns their digest."""
    staged = StagedUpload(dest, max_bytes=max_bytes)
    try:
        feed(staged, files, tarball)
        return staged.finish()
    finally:
        staged.abort()


def feed(staged: StagedUpload, files: list[UploadFile] | None, tarball: bytes | None) -> None:
    """Write an in-memory upload into ``staged`` as the fronts write a streamed one."""
    if (files is None) == (tarball is None):
        raise AdapterRejected("send the adapter either as files or as one tar.gz, not both or neither",
                              field="files")
    if files is not None:
        for f in files:
            staged.write_file(f.filename, f.data)
            staged.end_file(f.filename)
    else:
        staged.write_archive(tarball)


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
    # Shapes from the header first: a file of the wrong shapes is refused before one value is read.
    header = _checked_header(dest / WEIGHTS)
    ranks, targets = _check_tensors({k: tuple(e["shape"]) for k, e in header.items()}, config, base)
    _check_gain(_tensor_norms(dest / WEIGHTS, header), config)
    return AdapterInfo(
        rank=max(ranks), target_modules=sorted(targets),
        size_bytes=sum(f.stat().st_size for f in dest.iterdir() if f.is_file()),
        base_fingerprint=fingerprint, has_manifest=has_manifest,
    )


MAX_JSON_DEPTH = 16
"""PEFT configs, manifests and safetensors headers nest 3 or 4 levels deep."""


def load_json(raw: bytes | str, what: str) -> Any:
    """``json.loads`` that refuses what it cannot parse, including nesting deep enough to exhaust
    the interpreter's stack (json's C parser raises RecursionError there), or any deeper than
    :data:`MAX_JSON_DEPTH`, which later code would walk recursively."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what} is not valid JSON: {str(e) or 'nested too deeply'}") from None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return value


def _read_json(path: Path) -> dict:
    try:
        value = load_json(path.read_bytes(), path.name)
    except ValueError as e:
        raise AdapterRejected(str(e), field=path.name) from None
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
            header = load_json(f.read(n), "the header")
        except ValueError as e:
            raise _corrupted(str(e)) from None
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


def _checked_header(path: Path) -> dict[str, dict]:
    """The tensors' header entries (no metadata), each of a float dtype and a shape of sizes."""
    header = read_safetensors_header(path)
    tensors = {k: e for k, e in header.items() if k != "__metadata__"}
    for key, entry in tensors.items():
        if entry.get("dtype") not in FLOAT_DTYPES:
            raise AdapterRejected(f"tensor {key!r} is {entry.get('dtype')}; LoRA weights must be one of "
                                  f"{', '.join(sorted(FLOAT_DTYPES))}", field=WEIGHTS)
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _corrupted(f"tensor {key!r} has no valid shape")
    return tensors


TINY_NORM = 1e-15
"""Below this a float32 norm may have lost values whose squares underflow (under 1e-22 or so), and
a huge lora_A paired with such a lora_B would pass the gain check: taken again in float64."""


def _tensor_norms(path: Path, header: Mapping[str, dict]) -> dict[str, float]:
    """Every tensor's Frobenius norm, after checking that every value is finite in float32, the
    precision vLLM computes LoRA in at most (a NaN or inf in one tenant's weights turns its
    outputs into NaN, and on vLLM's CPU attention a NaN left in a freed KV-cache block reaches the
    next requests to use it). One tensor in memory at a time; shapes were checked from the header.

    One pass over the values: the norm, taken in float32, is finite exactly when every value is
    and no square overflows; only a tensor whose norm is not finite, or tiny, is looked at again
    (for NaN, then in float64). (Casting to float32, then isfinite, then a float64 norm took 8 times as long:
    about a second per 80 MiB adapter, for each of the hundreds a platform registers.)"""
    import torch
    from safetensors import safe_open

    norms = {}
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.dtype == torch.float64:
                    tensor = tensor.to(torch.float32)  # what a float64 adapter becomes in vLLM
                if list(tensor.shape) != header[key]["shape"]:
                    raise _corrupted(f"tensor {key!r} is not the shape its header gives")
                norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float32))
                if not math.isfinite(norm) and not bool(torch.isfinite(tensor).all()):
                    raise AdapterRejected(f"tensor {key!r} holds NaN or infinite values (in float32)", field=WEIGHTS)
                if not math.isfinite(norm) or norm < TINY_NORM:  # squares past float32's range, or under it
                    norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
                    if not math.isfinite(norm):
                        raise AdapterRejected(f"tensor {key!r} has values too large to compute with", field=WEIGHTS)
                norms[key] = norm
                del tensor
    except AdapterRejected:
        raise
    except Exception as e:  # the library's own parse errors have no common public type
        raise _corrupted(str(e)) from None
    return norms


_KEY = re.compile(r"(?:base_model\.model\.)?(model\.layers\.([0-9]+)\.([a-z_]+)\.([a-z_0-9]+))\.lora_([AB])\.weight")


def _parse_key(key: str) -> tuple[str, int, str, str, str] | None:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
    -> (``model.layers.3.self_attn.q_proj``, 3, ``self_attn``, ``q_proj``, ``A``)."""
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    module, index, parent, linear, ab = m.groups()
    return module, int(index), parent, linear, ab


def _rank_for(module: str, config: Mapping[str, Any]) -> int:
    """The rank PEFT gave this module. ``compat`` accepts ``rank_pattern`` entries only where they
    equal ``r`` (vLLM 0.25 ignores them), so no tenant-supplied pattern needs matching here."""
    return config["r"]


MAX_GAIN = 1e4
"""Largest bound on how much one module's LoRA update can amplify its input:
scaling x ||B||_F x ||A||_F (>= the spectral norm of scaling * B @ A). Trained adapters are at
1-100 (PEFT's init gives ||A||_F ~ sqrt(r/3), and B starts at zero); 1e37-scaled weights, which
overflow to inf inside the engine, are far above."""


def _check_gain(norms: Mapping[str, float], config: Mapping[str, Any]) -> None:
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") is True else r)
    for key, a_norm in norms.items():
        if not key.endswith(".lora_A.weight"):
            continue
        b_key = key.removesuffix(".lora_A.weight") + ".lora_B.weight"
        gain = abs(scaling) * a_norm * norms.get(b_key, 0.0)
        if gain > MAX_GAIN:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            raise AdapterRejected(f"{module}'s LoRA update can amplify its input {gain:.3g}-fold (scaling x "
                                  f"|B| x |A|), over the {MAX_GAIN:g} allowed: weights this large overflow in the "
                                  "engine (trained adapters are at 1-100)", field=WEIGHTS)


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
            raise AdapterRejected(f"tensor {key!r} is not a LoRA weight of this base (expected "
                                  "'model.layers.<i>.<self_attn|mlp>.<linear>.lora_A.weight' or '.lora_B.weight')",
                                  field=WEIGHTS)
        module, layer, parent, linear, ab = parsed
        if layer >= base.num_layers:
            raise AdapterRejected(f"tensor {key!r} is for layer {layer}, but {base.name} has {base.num_layers} "
                                  f"layers: {other_base}", field=WEIGHTS)
        if linear not in base.linear_shapes:
            raise AdapterRejected(f"tensor {key!r} targets {linear!r}, which {base.name} has no LoRA slot for",
                                  field=WEIGHTS)
        if parent != LINEAR_PARENTS.get(linear, parent):
            raise AdapterRejected(f"tensor {key!r} puts {linear} under {parent}, but {base.name} has it under "
                                  f"{LINEAR_PARENTS[linear]}: vLLM would silently drop it", field=WEIGHTS)
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
