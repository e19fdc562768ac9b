"""gRPC stubs are generated from proto/ on import, never stale, and safe to generate from several processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from server.api.grpc import codegen


def tree(root: Path) -> dict[str, bytes]:
    """What generation writes (not __pycache__)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_loaded_stubs_are_exactly_what_proto_generates(tmp_path):
    from server.api.grpc import pb

    codegen.generate(codegen.PROTO_ROOT, tmp_path / "fresh")
    assert tree(tmp_path / "fresh") == tree(codegen.GEN_DIR)
    for module in (pb.inference_pb2, pb.inference_pb2_grpc, pb.adapters_pb2, pb.adapters_pb2_grpc):
        assert Path(module.__file__).is_relative_to(codegen.GEN_DIR)
    assert {"loraplex/v1/inference_pb2.py", "loraplex/v1/adapters_pb2_grpc.py"} <= set(tree(codegen.GEN_DIR))


def test_a_changed_proto_regenerates_and_an_unchanged_one_does_not(tmp_path):
    protos, out = tmp_path / "proto", tmp_path / "gen"
    shutil.copytree(codegen.PROTO_ROOT, protos)
    assert codegen.ensure(protos, out) is True
    assert codegen.ensure(protos, out) is False
    before = tree(out)

    path = protos / "loraplex" / "v1" / "inference.proto"
    path.write_text(path.read_text().replace("message Usage {", "message Usage {\n  // Tokens from the cache.\n"
                                                                 "  uint32 cached_tokens = 4;"))
    assert codegen.ensure(protos, out) is True
    after = tree(out)
    assert after != before and b"cached_tokens" in after["loraplex/v1/inference_pb2.pyi"]
    assert after[codegen.STAMP] == (codegen.fingerprint(protos) + "\n").encode()
    assert not list(tmp_path.glob(".gen-*")), "scratch folders are cleaned up"


def test_generated_modules_import_each_other_relatively(tmp_path):
    codegen.generate(codegen.PROTO_ROOT, tmp_path / "gen")
    grpc_module = (tmp_path / "gen" / "loraplex" / "v1" / "inference_pb2_grpc.py").read_text()
    assert "from ...loraplex.v1 import inference_pb2 as" in grpc_module
    assert "from loraplex" not in grpc_module


def test_concurrent_processes_generate_once_and_agree(tmp_path):
    protos, out = tmp_path / "proto", tmp_path / "gen"
    shutil.copytree(codegen.PROTO_ROOT, protos)
    script = ("import sys; from pathlib import Path; from server.api.grpc import codegen; "
              "print(codegen.ensure(Path(sys.argv[1]), Path(sys.argv[2])))")
    root = Path(codegen.__file__).parents[3]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(protos), str(out)], cwd=root,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(results) == ["False", "False", "True"]  # one generated; the others waited and found it done
    codegen.generate(protos, tmp_path / "reference")
    assert tree(out) == tree(tmp_path / "reference")
