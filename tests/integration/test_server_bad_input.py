"""Bad input: the right status, an OpenAI-shaped error naming the field, nothing half-done."""

from __future__ import annotations

import io
import json
import tarfile

import pytest


def err(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) >= {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


@pytest.fixture
def alice(cluster):
    with cluster.http("alice") as h:
        yield h


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_unknown_model(alice):
    e = err(alice.post("/v1/chat/completions", json={**CHAT, "model": "tiny:nope"}), 404, "model")
    assert e["code"] == "model_not_found" and "tiny:nope" in e["message"]
    err(alice.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")


def test_malformed_json(alice):
    r = alice.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers={
        "content-type": "application/json"})
    assert err(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize("patch, param", [
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"n": 0}, "n"),
    ({"model": 5}, "model"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_wrong_types_name_the_field(alice, patch, param):
    err(alice.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param)


def test_n_with_greedy(alice):
    e = err(alice.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2, "temperature": 0}), 400, "n")
    assert "temperature" in e["message"]


def test_missing_field(alice):
    err(alice.post("/v1/completions", json={"model": "tiny"}), 400, "prompt")


def test_max_tokens_beyond_context(alice):
    e = err(alice.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 1000}),
            400, "max_tokens")
    assert "256" in e["message"]


def test_prompt_too_long(alice):
    long = "january " * 400
    err(alice.post("/v1/completions", json={"model": "tiny", "prompt": long, "max_tokens": 1}), 400, "prompt")
    err(alice.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": long}]}),
        400, "messages")


def test_empty_messages(alice):
    err(alice.post("/v1/chat/completions", json={**CHAT, "messages": []}), 400, "messages")


# ---------------------------------------------------------------- uploads: refused, nothing left


def blobs(cluster) -> set[str]:
    root = cluster.server.data_dir / "adapters"
    return {p.name for p in (root / "sha256").glob("*")} | {p.name for p in (root / ".staging").glob("*")}


def files_of(d, **replace):
    out = []
    for f in sorted(d.iterdir()):
        if f.is_file():
            data = replace.pop(f.name, f.read_bytes())
            if data is not None:
                out.append(("files", (f.name, data)))
    out += [("files", (name, data)) for name, data in replace.items()]
    return out


@pytest.fixture
def refused(cluster, alice):
    """Check that a refused upload registered nothing and left no file behind."""
    before_blobs = blobs(cluster)
    before = {a["id"] for a in alice.get("/v1/adapters").json()["data"]}

    def check(r, param):
        e = err(r, 400, param)
        assert {a["id"] for a in alice.get("/v1/adapters").json()["data"]} == before
        assert blobs(cluster) == before_blobs
        return e

    return check


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", "bad\x01name", "", "x" * 200])
def test_bad_adapter_names(cluster, alice, refused, name):
    r = alice.post("/v1/adapters", data={"name": name}, files=files_of(cluster.adapters["a1"]))
    refused(r, "name")


def test_corrupted_safetensors(cluster, alice, refused):
    d = cluster.adapters["a1"]
    garbage = b"\xff" * 64
    r = alice.post("/v1/adapters", data={"name": "corrupt"},
                   files=files_of(d, **{"adapter_model.safetensors": garbage}))
    refused(r, "adapter_model.safetensors")


def test_truncated_safetensors(cluster, alice, refused):
    d = cluster.adapters["a1"]
    data = (d / "adapter_model.safetensors").read_bytes()
    r = alice.post("/v1/adapters", data={"name": "truncated"},
                   files=files_of(d, **{"adapter_model.safetensors": data[: len(data) // 2]}))
    assert "truncated" in refused(r, "adapter_model.safetensors")["message"]


def test_pickle_bin_is_refused(cluster, alice, refused):
    d = cluster.adapters["a1"]
    r = alice.post("/v1/adapters", data={"name": "pickled"},
                   files=files_of(d, **{"adapter_model.safetensors": None, "adapter_model.bin": b"\x80\x04pickle"}))
    assert "pickle" in refused(r, None)["message"].lower()


def test_tarball_with_path_traversal(cluster, alice, refused):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"{}"
        info = tarfile.TarInfo("../../evil.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    r = alice.post("/v1/adapters", data={"name": "evil"}, files={"archive": ("a.tar.gz", buf.getvalue())})
    refused(r, None)


def test_adapter_for_another_base(cluster, alice, refused, tmp_path):
    from tests.tiny import make_adapter, make_tiny_llama

    # Same architecture, other shapes: a different base entirely.
    other = make_tiny_llama(tmp_path / "other", seed=5)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=64, head_dim=32, intermediate_size=128)
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoConfig, LlamaForCausalLM

    LlamaForCausalLM(AutoConfig.from_pretrained(other)).save_pretrained(other)
    foreign = make_adapter(other, tmp_path / "foreign")
    r = alice.post("/v1/adapters", data={"name": "foreign"}, files=files_of(foreign))
    assert "another base" in refused(r, "adapter_model.safetensors")["message"]
    # Same shapes, but a manifest that records another base's fingerprint.
    manifest = json.dumps({"base": {"fingerprint": "0" * 64}}).encode()
    r = alice.post("/v1/adapters", data={"name": "foreign2"},
                   files=files_of(cluster.adapters["a1"], **{"loraplex.json": manifest}))
    refused(r, "base_fingerprint")


def test_rank_above_max_lora_rank(cluster, alice, refused, tmp_path):
    from tests.tiny import make_adapter

    big = make_adapter(cluster.base, tmp_path / "r32", r=32)
    e = refused(alice.post("/v1/adapters", data={"name": "big"}, files=files_of(big)), "r")
    assert "--max-lora-rank is 16" in e["message"]


def test_dora_and_modules_to_save(cluster, alice, refused):
    d = cluster.adapters["a1"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    for patch, param in (({"use_dora": True}, "use_dora"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")):
        bad = json.dumps({**cfg, **patch}).encode()
        r = alice.post("/v1/adapters", data={"name": "bad"}, files=files_of(d, **{"adapter_config.json": bad}))
        refused(r, param)


def test_duplicate_name_is_409_and_keeps_the_original(cluster, alice):
    assert cluster.upload("alice", "dup", "a1").status_code == 201
    before = alice.get("/v1/adapters/dup").json()
    r = cluster.upload("alice", "dup", "a2")
    assert err(r, 409, "name")["code"] == "conflict"
    assert alice.get("/v1/adapters/dup").json() == before


def _multipart(cluster, name: str, *, close: bool = True) -> tuple[bytes, str]:
    boundary = "loraplexboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()]
    for f in sorted(cluster.adapters["a1"].iterdir()):
        if f.is_file():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{f.name}"\r\n'
                         "Content-Type: application/octet-stream\r\n\r\n".encode() + f.read_bytes() + b"\r\n")
    if close:
        parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def test_a_multipart_body_without_its_closing_boundary_is_refused(cluster, alice, refused):
    body, ctype = _multipart(cluster, "truncated", close=False)
    refused(alice.post("/v1/adapters", content=body, headers={"content-type": ctype}), "files")
    body, ctype = _multipart(cluster, "whole")
    r = alice.post("/v1/adapters", content=body, headers={"content-type": ctype})
    assert r.status_code == 201, r.text  # the same body, closed, is a good upload
    assert alice.delete("/v1/adapters/whole").status_code == 200


def test_an_upload_cut_off_by_its_client_leaves_nothing(cluster, alice):
    """The client sends half the body and hangs up: the staging directory goes, and the server
    logs it as what it is, not as an unhandled error."""
    import socket

    before = blobs(cluster)
    body, ctype = _multipart(cluster, "gone")
    mark = cluster.server.log_size()
    with socket.create_connection(("127.0.0.1", cluster.server.port)) as s:
        head = (f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {cluster.keys['alice']}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        s.sendall(head + body[: len(body) // 2])
    cluster.server.wait_for_log("client went away during POST /v1/adapters", since=mark, timeout=30)
    assert blobs(cluster) == before
    log = cluster.server.log_path.read_bytes()[mark:].decode(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log
    assert "gone" not in {a["id"] for a in alice.get("/v1/adapters").json()["data"]}
