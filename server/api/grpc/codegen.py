"""Python stubs for ``proto/``, generated on import and never committed.

A checkout generates them from its ``proto/``; a wheel ships a copy of ``proto/`` and the stubs
built from it (``setup.py``), and regenerates them from that copy if the installed grpcio-tools
differs from the one that built them.

``ensure()`` compares a fingerprint of the inputs (every ``.proto`` file, the
grpcio-tools version, and this module's own source) with the one stored next
to the generated code in ``_gen/PROTO_SHA256``, and regenerates only when they
differ. Generation runs ``grpc_tools.protoc`` in-process into a scratch folder
that is then renamed into place, under a file lock, so two processes starting
at once neither race nor import half-written modules.

protoc writes imports between generated modules as absolute
(``from loraplex.v1 import x_pb2``), as if ``_gen`` were on ``sys.path``; they
are rewritten to relative imports so the stubs live inside this package.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

from filelock import FileLock

_SOURCE_PROTO = Path(__file__).resolve().parents[3] / "proto"
_PACKAGED_PROTO = Path(__file__).resolve().parent / "proto"
PROTO_ROOT = _SOURCE_PROTO if (_SOURCE_PROTO / "loraplex").is_dir() else _PACKAGED_PROTO
"""The source tree's proto/ (a checkout, an editable install), else the copy a wheel ships."""
GEN_DIR = Path(__file__).resolve().parent / "_gen"
STAMP = "PROTO_SHA256"


def proto_files(proto_root: Path) -> list[Path]:
    return sorted(proto_root.rglob("*.proto"))


def fingerprint(proto_root: Path) -> str:
    h = hashlib.sha256()
    h.update(f"grpcio-tools {version('grpcio-tools')}\n".encode())
    h.update(Path(__file__).read_bytes())
    for p in proto_files(proto_root):
        h.update(p.relative_to(proto_root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def stamp(out: Path) -> str | None:
    try:
        return (out / STAMP).read_text().strip()
    except FileNotFoundError:
        return None


def generate(proto_root: Path, out: Path) -> None:
    """Run protoc on every .proto under ``proto_root`` into ``out`` (made if missing); stamp it last."""
    from grpc_tools import protoc

    protos = proto_files(proto_root)
    if not protos:
        raise RuntimeError(f"no .proto files under {proto_root}")
    out.mkdir(parents=True, exist_ok=True)
    wkt = files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    rc = protoc.main(["grpc_tools.protoc", f"-I{proto_root}", f"-I{wkt}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, protos)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {proto_root} (exit {rc}); its message is above")
    packages = {p.relative_to(proto_root).parts[0] for p in protos}
    for path in sorted(out.rglob("*")):
        if path.is_dir():
            (path / "__init__.py").touch()
        elif path.suffix in (".py", ".pyi"):
            _relative_imports(path, out, packages)
    (out / "__init__.py").touch()
    (out / STAMP).write_text(fingerprint(proto_root) + "\n")


def _relative_imports(path: Path, out: Path, packages: set[str]) -> None:
    # from loraplex.v1 import x_pb2 as y   ->   from ...loraplex.v1 import x_pb2 as y  (in _gen/loraplex/v1/)
    dots = "." * len(path.relative_to(out).parts)
    pattern = re.compile(rf"^from ({'|'.join(map(re.escape, sorted(packages)))})(\.[\w.]+)? import ", re.M)
    text = path.read_text()
    path.write_text(pattern.sub(lambda m: f"from {dots}{m[1]}{m[2] or ''} import ", text))


def ensure(proto_root: Path = PROTO_ROOT, out: Path = GEN_DIR) -> bool:
    """Make ``out`` match ``proto_root``; True when it had to (re)generate."""
    if not proto_root.is_dir():
        if stamp(out):  # installed without the sources: use what was generated at build time
            return False
        raise RuntimeError(f"no gRPC stubs in {out} and no {proto_root} to generate them from")
    want = fingerprint(proto_root)
    if stamp(out) == want:
        return False
    with FileLock(str(out.with_name(f".{out.name}.lock"))):
        if stamp(out) == want:  # another process generated them while we waited
            return False
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            generate(proto_root, scratch / "new")
            if out.exists():
                out.rename(scratch / "old")
            (scratch / "new").rename(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return True
