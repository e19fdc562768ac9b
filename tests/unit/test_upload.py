"""Uploads: a good adapter lands in the store; every bad one is refused with nothing left behind."""

from __future__ import annotations

import tarfile

import pytest

from server.adapters.registry import AdapterRegistry, validate_name
from server.adapters.store import AdapterStore
from server.adapters.upload import MANIFEST, UploadFile, unpack, validate
from server.db import Database
from server.errors import AdapterRejected, InvalidArgument, PayloadTooLarge
from server.tenants import Quotas, TenantStore
from tests.adapter_files import (
    FINGERPRINT, adapter_config, adapter_files, lora_tensors, tar_gz, tiny_base, uploads,
)

BASE = tiny_base()


class Server:
    """The upload path as the service runs it: check the name, ingest, register."""

    def __init__(self, root):
        self.db = Database(root / "registry.sqlite3")
        self.store = AdapterStore(root / "adapters")
        self.registry = AdapterRegistry(self.db)
        TenantStore(self.db).create("acme")

    def upload(self, name="support-bot", *, files=None, tarball=None, quotas=Quotas()):
        validate_name(name)
        with self.store.staging_dir() as staging:  # unpack -> validate -> put, as AdapterService.add does
            digest = unpack(files, tarball, staging)
            info = validate(staging, BASE, max_rank=quotas.max_rank)
            self.store.put(staging, digest=digest)
        return self.registry.add("acme", name, digest, info, max_adapters=quotas.max_adapters)

    def assert_nothing_kept(self):
        assert list((self.store.root / ".staging").iterdir()) == []
        assert self.store.digests() == set()
        assert self.registry.list_all() == [] and self.registry.live_digests() == set()


@pytest.fixture
def server(tmp_path):
    return Server(tmp_path)


def test_good_adapter_is_stored_and_registered(server):
    record = server.upload(files=uploads(adapter_files()))
    path = server.store.path(record.digest)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", MANIFEST]
    assert (record.rank, record.target_modules, record.base_fingerprint) == (8, ("q_proj", "v_proj"), FINGERPRINT)
    assert record.size_bytes == server.store.size_bytes(record.digest)
    assert list((server.store.root / ".staging").iterdir()) == []


def test_identical_uploads_share_one_blob(server):
    files = adapter_files()
    a = server.upload("a", files=uploads(files))
    b = server.upload("b", tarball=tar_gz({f"out/{n}": d for n, d in files.items()}))
    assert a.digest == b.digest and server.store.digests() == {a.digest}
    assert list((server.store.root / ".staging").iterdir()) == []


def test_tarball_of_a_trainer_output_dir(server):
    files = {**adapter_files(), "README.md": b"# card", "metrics.jsonl": b"{}\n"}
    record = server.upload(tarball=tar_gz({f"./my-adapter/{n}": d for n, d in files.items()}))
    assert "README.md" not in {p.name for p in server.store.path(record.digest).iterdir()}


def test_per_module_rank_is_refused_and_a_pattern_that_changes_nothing_is_accepted(server):
    """vLLM 0.25 ignores rank_pattern (it would serve q_proj with r=8's scaling): refused on both lines."""
    config = adapter_config(r=8, rank_pattern={"q_proj": 16})
    tensors = lora_tensors(8, ("q_proj", "v_proj"), ranks={"q_proj": 16})
    with pytest.raises(AdapterRejected, match="vLLM 0.25 ignores them") as e:
        server.upload(files=uploads(adapter_files(config=config, tensors=tensors)))
    assert e.value.field == "rank_pattern[q_proj]"
    server.assert_nothing_kept()
    same = adapter_config(r=8, rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 16})
    assert server.upload(files=uploads(adapter_files(config=same))).rank == 8


def test_adapter_without_manifest_is_accepted(tmp_path):
    unpack(uploads(adapter_files(fingerprint=None)), None, tmp_path)
    info = validate(tmp_path, BASE, max_rank=64)
    assert not info.has_manifest and info.base_fingerprint is None


def _good():
    return adapter_files()


def _truncated():
    files = _good()
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-100]
    return files


def _corrupted_header():
    files = _good()
    st = files["adapter_model.safetensors"]
    files["adapter_model.safetensors"] = st[:8] + b"#" * 16 + st[24:]
    return files


def _unknown_dtype():  # a header our size check accepts and the safetensors library does not
    files = _good()
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"].replace(b'"F32"', b'"Q32"')
    return files


def _int_weights():
    import torch

    tensors = {k: (v * 100).to(torch.int32) for k, v in lora_tensors().items()}
    return adapter_files(tensors=tensors)


def _nan_weights():
    tensors = lora_tensors()
    next(iter(tensors.values()))[0, 0] = float("nan")
    return adapter_files(tensors=tensors)


def _overlapping_offsets():
    """Every tensor claims the first bytes of the data: the sizes add up, the layout lies."""
    import json as _json
    import struct

    st = _good()["adapter_model.safetensors"]
    n = struct.unpack("<Q", st[:8])[0]
    header = _json.loads(st[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    end = max(header[k]["data_offsets"][1] for k in keys)
    first = header[keys[0]]["data_offsets"]
    header[keys[1]]["data_offsets"] = list(first)
    header[keys[0]]["data_offsets"] = [first[0], end] if first[1] != end else first
    raw = _json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    return {**_good(), "adapter_model.safetensors": struct.pack("<Q", len(raw)) + raw + st[8 + n:]}


def _many_members(n):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(n):  # empty directory entries: no bytes, only members to walk through
            info = tarfile.TarInfo(f"d{i}")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
    return buf.getvalue()


def _long_header(kind):
    """A tar whose first member declares a 16 MiB extended header (compressed to a few KB)."""
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("././@LongLink")
        info.type, info.size = kind, 16 << 20
        tar.addfile(info, io.BytesIO(b"a" * (16 << 20)))
    return buf.getvalue()


def _nested(depth):
    import json as _json

    value = {"r": 8}
    for _ in range(depth):
        value = {"x": value}
    return _json.dumps({**_json.loads(_good()["adapter_config.json"]), "extra": value}).encode()


def _misplaced():
    tensors = {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in lora_tensors().items()}
    return adapter_files(tensors=tensors)


def _scaled(factor, *, f64=False):
    import torch

    tensors = {k: (v.to(torch.float64) if f64 else v) * factor for k, v in lora_tensors().items()}
    return adapter_files(tensors=tensors)


def _huge_a_tiny_b():
    """lora_A's squares overflow float32 and lora_B's underflow it: a float32 norm alone would
    make B's 0 and the gain 0."""
    tensors = {k: v * (1e30 if "lora_A" in k else 1e-24) for k, v in lora_tensors().items()}
    return adapter_files(tensors=tensors)


def _config_without(key):
    import json as _json

    files = _good()
    config = _json.loads(files["adapter_config.json"])
    del config[key]
    files["adapter_config.json"] = _json.dumps(config).encode()
    return files


def _other_base_shapes():
    big = {"q_proj": (256, 256), "v_proj": (256, 128)}  # hidden 256: another model
    return adapter_files(tensors=lora_tensors(8, ("q_proj", "v_proj"), linears=big))


def _other_base_shapes_with_nan():
    """The shapes (from the header) are refused before any value is read: the NaN is never seen."""
    big = {"q_proj": (256, 256), "v_proj": (256, 128)}
    tensors = lora_tensors(8, ("q_proj", "v_proj"), linears=big)
    next(iter(tensors.values()))[0, 0] = float("nan")
    return adapter_files(tensors=tensors)


def _other_base_layers():
    return adapter_files(tensors=lora_tensors(8, ("q_proj", "v_proj"), layers=4))


REJECTED = {
    "corrupted safetensors": (dict(files=_corrupted_header), "adapter_model.safetensors", "not valid JSON"),
    "truncated safetensors": (dict(files=_truncated), "adapter_model.safetensors", "header describes"),
    "unknown dtype": (dict(files=_unknown_dtype), "adapter_model.safetensors", "must be one of"),
    "integer weights": (dict(files=_int_weights), "adapter_model.safetensors", "is I32"),
    "NaN weights": (dict(files=_nan_weights), "adapter_model.safetensors", "NaN or infinite"),
    "lying header (offsets overlap)": (dict(files=_overlapping_offsets), "adapter_model.safetensors", "corrupted"),
    "no lora_alpha": (dict(files=lambda: _config_without("lora_alpha")), "lora_alpha", "required"),
    "lora_alpha a string": (dict(files=lambda: adapter_files(config=adapter_config(lora_alpha="16"))),
                            "lora_alpha", "finite number"),
    "use_qalora": (dict(files=lambda: adapter_files(config=adapter_config(use_qalora=True))), "use_qalora",
                   "QA-LoRA"),
    "tar with too many members": (dict(tarball=lambda: _many_members(70)), "files", "more than 64 members"),
    "tar with a huge long-name header": (dict(tarball=lambda: _long_header(tarfile.GNUTYPE_LONGNAME)), "files",
                                         "extended header"),
    "tar with a huge pax header": (dict(tarball=lambda: _long_header(tarfile.XHDTYPE)), "files", "extended header"),
    "gzip without its trailer": (dict(tarball=lambda: tar_gz(_good())[:-8]), "files", "not a readable tar.gz"),
    "config nested too deeply": (dict(files=lambda: {**_good(), "adapter_config.json": b"[" * 5000 + b"]" * 5000}),
                                 "adapter_config.json", "not valid JSON"),
    "config nested 20 levels": (dict(files=lambda: {**_good(), "adapter_config.json": _nested(20)}),
                                "adapter_config.json", "more than 16 levels"),
    "manifest nested too deeply": (dict(files=lambda: {**_good(), "loraplex.json": b"[" * 100000 + b"]" * 100000}),
                                   "loraplex.json", "not valid JSON"),
    "target_modules of objects": (dict(files=lambda: adapter_files(config=adapter_config(targets=[{"a": 1}]),
                                                                   tensors=lora_tensors())),
                                  "target_modules", "non-empty list of module names"),
    "q_proj under mlp": (dict(files=_misplaced), "adapter_model.safetensors", "vLLM would silently drop it"),
    "weights scaled by 1e37": (dict(files=lambda: _scaled(1e37)), "adapter_model.safetensors", "amplify its input"),
    "huge lora_A, vanishing lora_B": (dict(files=_huge_a_tiny_b), "adapter_model.safetensors", "amplify its input"),
    "float64 weights beyond float32": (dict(files=lambda: _scaled(1e300, f64=True)), "adapter_model.safetensors",
                                       "NaN or infinite values (in float32)"),
    "pickle .bin": (dict(files=lambda: {**_good(), "adapter_model.bin": b"\x80\x04K\x01."}), "files", "pickle"),
    "pickle instead of safetensors": (
        dict(files=lambda: {"adapter_config.json": _good()["adapter_config.json"], "adapter_model.pt": b"\x80"}),
        "files", "safetensors"),
    "file name with ..": (dict(files=lambda: {**_good(), "../adapter_config.json": b"{}"}), "files", ".."),
    "file name with a slash": (dict(files=lambda: {**_good(), "sub/loraplex.json": b"{}"}), "files", "paths"),
    "control character": (dict(files=lambda: {**_good(), "loraplex\n.json": b"{}"}), "files", "control"),
    "unexpected file": (dict(files=lambda: {**_good(), "tokenizer.json": b"{}"}), "files", "tokenizer.json"),
    "missing weights": (dict(files=lambda: {"adapter_config.json": _good()["adapter_config.json"]}),
                        "files", "adapter_model.safetensors"),
    "tar path traversal": (dict(tarball=lambda: tar_gz({**_good(), "../../etc/adapter_config.json": b"{}"})),
                           "files", "unsafe path"),
    "tar absolute path": (dict(tarball=lambda: tar_gz({"/tmp/adapter_config.json": b"{}", **_good()})),
                          "files", "unsafe path"),
    "tar symlink": (dict(tarball=lambda: tar_gz(_good(), links={"loraplex.json": "/etc/passwd"})),
                    "files", "link"),
    "tar nested too deep": (dict(tarball=lambda: tar_gz({f"a/b/{n}": d for n, d in _good().items()})),
                            "files", "one folder"),
    "not a tarball": (dict(tarball=lambda: b"PK\x03\x04 a zip, say"), "files", "tar.gz"),
    "invalid JSON config": (dict(files=lambda: {**_good(), "adapter_config.json": b"{r: 8"}),
                            "adapter_config.json", "not valid JSON"),
    "rank above max_rank": (dict(files=lambda: adapter_files(config=adapter_config(r=128))), "r", "64"),
    "DoRA": (dict(files=lambda: adapter_files(config=adapter_config(use_dora=True))), "use_dora", "DoRA"),
    "modules_to_save": (dict(files=lambda: adapter_files(config=adapter_config(modules_to_save=["lm_head"]))),
                        "modules_to_save", "lm_head"),
    "shapes of another base": (dict(files=_other_base_shapes), "adapter_model.safetensors", "another base"),
    "layers of another base": (dict(files=_other_base_layers), "adapter_model.safetensors", "another base"),
    "shapes of another base, with a NaN": (dict(files=_other_base_shapes_with_nan), "adapter_model.safetensors",
                                           "another base"),
    "fingerprint of another base": (dict(files=lambda: adapter_files(fingerprint="cd" * 32)),
                                    "base_fingerprint", "another base"),
    "no tensors": (dict(files=lambda: adapter_files(tensors={})), "adapter_model.safetensors", "no tensors"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_rejected_upload_leaves_nothing(server, case):
    how, field, words = REJECTED[case]
    (kind, make), = how.items()
    kwargs = {"files": uploads(make())} if kind == "files" else {"tarball": make()}
    with pytest.raises(AdapterRejected) as e:
        server.upload(**kwargs)
    assert e.value.field == field
    assert words in e.value.message
    server.assert_nothing_kept()


@pytest.mark.parametrize("name", ["..", "a..b", "../x", "a/b", "a\nb", "", ".hidden", "x" * 129])
def test_bad_adapter_name_is_refused_before_anything_is_stored(server, name):
    with pytest.raises(InvalidArgument) as e:
        server.upload(name, files=uploads(adapter_files()))
    assert e.value.field == "name"
    server.assert_nothing_kept()


def test_violations_are_reported_together(server):
    config = adapter_config(use_dora=True, modules_to_save=["lm_head"])
    with pytest.raises(AdapterRejected) as e:
        server.upload(files=uploads(adapter_files(config=config)))
    assert "DoRA" in e.value.message and "modules_to_save" in e.value.message


def test_lone_lora_a_is_refused(tmp_path):
    tensors = lora_tensors()
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    unpack(uploads(adapter_files(tensors=tensors)), None, tmp_path)
    with pytest.raises(AdapterRejected, match="only one of lora_A/lora_B"):
        validate(tmp_path, BASE, max_rank=64)


def test_files_and_tarball_together_are_refused(tmp_path):
    with pytest.raises(AdapterRejected, match="not both"):
        unpack([UploadFile("adapter_config.json", b"{}")], tar_gz({}), tmp_path)


def test_size_cap_applies_to_tarballs_and_what_they_unpack_to(tmp_path):
    files = adapter_files()
    with pytest.raises(PayloadTooLarge, match="larger than 1000 bytes"):
        unpack(None, tar_gz(files), tmp_path, max_bytes=1000)
    bomb = tar_gz({"adapter_model.safetensors": b"\0" * 200_000, "adapter_config.json": b"{}"})
    assert len(bomb) < 2000
    (tmp_path / "b").mkdir()
    with pytest.raises(PayloadTooLarge, match="unpacks to more than 2000 bytes"):
        unpack(None, bomb, tmp_path / "b", max_bytes=2000)


def test_trailing_bytes_after_tensors_are_refused(tmp_path):
    files = adapter_files()
    files["adapter_model.safetensors"] += b"\0" * 8
    unpack(uploads(files), None, tmp_path)
    with pytest.raises(AdapterRejected, match="header describes"):
        validate(tmp_path, BASE, max_rank=64)


def test_manifest_must_be_json(tmp_path):
    unpack(uploads({**adapter_files(), "loraplex.json": b"not json"}), None, tmp_path)
    with pytest.raises(AdapterRejected) as e:
        validate(tmp_path, BASE, max_rank=64)
    assert e.value.field == "loraplex.json"


def test_base_spec_from_config():
    assert BASE.architecture == "LlamaForCausalLM" and BASE.num_layers == 2
    assert BASE.linear_shapes["k_proj"] == (128, 64) and BASE.linear_shapes["down_proj"] == (256, 128)
