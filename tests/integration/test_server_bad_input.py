"""Bad input: the right status, an OpenAI-shaped error naming the field, nothing half-done."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from tests.integration.server_proc import raw_request, request_head, upload_head


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
    ({"stop": ["a"] * 65}, "stop"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"top_k": -2}, "top_k"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
])
def test_wrong_types_name_the_field(alice, patch, param):
    err(alice.post("/v1/chat/completions", json={**CHAT, **patch}), 400, param)


def test_n_with_greedy_gives_identical_choices(alice):
    """OpenAI serves it (vLLM 0.32 refuses it): the engine computes one greedy choice, sent n times."""
    r = alice.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 3, "temperature": 0, "max_tokens": 4})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2] and len({c["text"] for c in choices}) == 1
    assert r.json()["usage"]["completion_tokens"] == 12


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


def left_behind(cluster, before: set[str]) -> set[str]:
    """The blobs and staging directories that appeared since ``before``. Meanwhile the gc may
    reclaim an earlier test's deleted adapter (its blob goes, through a ``delete-<digest>-...``
    directory for an instant): that is not this request's doing. A refused upload adds nothing."""
    return {n for n in blobs(cluster) - before if not (n.startswith("delete-") and n.split("-")[1] in before)}


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
        assert left_behind(cluster, before_blobs) == set()
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
    after = alice.get("/v1/adapters/dup").json()
    # residency may move on (content the server accepted before is loaded in the background)
    assert {**after, "residency": None} == {**before, "residency": None}


def test_a_taken_name_is_refused_before_the_files_are_sent(cluster, alice):
    """A 2 GiB upload whose form names a taken adapter: the 409 comes once the form names it,
    while the client has sent 1 MiB of its files (a server that read on would answer 408)."""
    assert cluster.upload("alice", "taken", "a1").status_code == 201
    head = _post("/v1/adapters", 2 << 30, cluster.keys["alice"], "multipart/form-data; boundary=b")
    status, _, body, _ = _raw(cluster, head, upload_head("taken") + b"\0" * (1 << 20))
    assert status == 409 and json.loads(body)["error"]["param"] == "name", body
    assert alice.delete("/v1/adapters/taken").status_code == 200


def test_a_form_that_pads_its_fields_or_its_boundary_is_a_400(cluster):
    """Spaces after a boundary are its padding, parsed a byte at a time in Python (2 GiB held a
    core for minutes): the first file part must begin within 128 KiB. A boundary python-multipart
    refuses (over 256 bytes) was a 500."""
    key = cluster.keys["alice"]
    padded = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\npadded\r\n--b' + b" " * (2 << 20)
    for ctype, body in (("multipart/form-data; boundary=b", padded),
                        ("multipart/form-data; boundary=" + "x" * 300, upload_head("long", "x" * 300))):
        status, _, answer, _ = _raw(cluster, _post("/v1/adapters", 4 << 20, key, ctype), body)
        assert status == 400 and json.loads(answer)["error"]["param"] == "files", answer


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
    assert left_behind(cluster, before) == set()
    log = cluster.server.log_path.read_bytes()[mark:].decode(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log
    assert "gone" not in {a["id"] for a in alice.get("/v1/adapters").json()["data"]}


# ---------------------------------------------------------------- bounded input, before any work




def _post(path: str, length: int, key: str | None, ctype: str = "application/json") -> str:
    return request_head("POST", path, length, key, ctype)


def _raw(cluster, head: str, body: bytes = b"", *, wait: float = 15.0) -> tuple[int, dict, bytes, float]:
    return raw_request(cluster.server.port, head, body, wait=wait)


def test_no_key_is_refused_before_the_body_is_read(cluster):
    """2 GiB claimed, nothing sent: the 401 comes at once, for JSON routes and uploads alike."""
    for path, ctype in (("/v1/chat/completions", "application/json"),
                        ("/v1/adapters", "multipart/form-data; boundary=x")):
        status, headers, body, seconds = _raw(cluster, _post(path, 2 << 30, None, ctype))
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert seconds < 5


def test_a_body_over_the_cap_is_a_413_at_once(cluster):
    status, _, body, seconds = _raw(cluster, _post("/v1/completions", 2 << 30, cluster.keys["alice"]))
    e = json.loads(body)["error"]
    assert status == 413 and e["code"] == "payload_too_large" and "--max-request-bytes" in e["message"]
    assert seconds < 5


def test_a_json_body_without_a_length_is_cut_at_the_cap(alice):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
    e = err(alice.post("/v1/completions", content=chunks()), 413, "body")
    assert e["code"] == "payload_too_large"


def test_a_claimed_2gib_upload_that_sends_1mib_is_answered_within_seconds(cluster):
    """Under --max-upload-bytes, so not refused by its length: the pause after 1 MiB is a 408."""
    head = _post("/v1/adapters", 2 << 30, cluster.keys["alice"], "multipart/form-data; boundary=b")
    part = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nstalled\r\n' \
           b'--b\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n\r\n'
    before = blobs(cluster)
    status, _, body, seconds = _raw(cluster, head, part + b"\0" * (1 << 20))
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert seconds < 10
    assert left_behind(cluster, before) == set()


def test_a_slow_drip_json_body_is_a_408(cluster):
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
    status, _, resp, seconds = _raw(cluster, _post("/v1/completions", len(body), cluster.keys["alice"]), body[:10])
    assert status == 408 and json.loads(resp)["error"]["param"] == "body"
    assert seconds < 10


def test_a_prompt_over_the_character_cap_is_refused_before_tokenizing(alice, cluster):
    e = err(alice.post("/v1/completions", json={"model": "tiny", "prompt": "word " * 200_000}), 400, "prompt")
    assert "--max-prompt-chars" in e["message"]
    e = err(alice.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": "w" * 10**6}]}),
            400, "messages")
    assert "characters" in e["message"]


@pytest.mark.parametrize("ids", [[1, 2, 10**9], [5, -1], [3, 2**31]])
def test_token_ids_outside_the_vocabulary_are_a_400(alice, ids):
    e = err(alice.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 2}), 400, "prompt")
    assert "vocabulary" in e["message"]
    assert alice.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2}).status_code == 200


def test_a_lora_path_with_a_nul_byte_is_a_400(cluster):
    with cluster.http("admin") as admin:
        e = err(admin.post("/v1/load_lora_adapter", json={"lora_name": "nul", "lora_path": "/tmp/a\u0000b"}), 400,
                "lora_path")
        assert "NUL" in e["message"]


@pytest.mark.parametrize("kwargs", [{"conversation": []}, {"return_dict": True}, {"tokenize": True},
                                    {"tools": []}])
def test_chat_template_kwargs_that_are_the_servers_own_are_a_400(alice, kwargs):
    body = {**CHAT, "chat_template_kwargs": kwargs}
    e = err(alice.post("/v1/chat/completions", json=body), 400, "chat_template_kwargs")
    assert repr(next(iter(kwargs))) in e["message"]
    body = {"model": "tiny", "messages": CHAT["messages"], "chat_template_kwargs": kwargs}
    err(alice.post("/tokenize", json=body), 400, "chat_template_kwargs")


def test_tools_count_against_the_character_cap_before_rendering(alice):
    """Small messages, 2 MB of tools: refused as the prompt they would become, and never rendered
    or tokenized (it was 6.9 s of tokenizing on the event loop, then a cheap 400)."""
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 64_000,
                                               "parameters": {"type": "object", "properties": {}}}}
             for i in range(32)]
    e = err(alice.post("/v1/chat/completions", json={**CHAT, "tools": tools}), 400, "tools")
    assert "--max-prompt-chars" in e["message"]
    body = {"model": "tiny", "messages": CHAT["messages"], "tools": tools}
    err(alice.post("/tokenize", json=body), 400, "tools")
    small = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    assert alice.post("/v1/chat/completions", json={**CHAT, "tools": small}).status_code == 200


def test_id_lists_are_bounded_before_they_are_walked(alice):
    """Lists of token ids cost O(n) on the event loop to check and decode: each is bounded first
    (a context for /detokenize, the vocabulary for sampling's id lists)."""
    e = err(alice.post("/detokenize", json={"model": "tiny", "tokens": [1] * 100_000}), 400, "tokens")
    assert "at most 256" in e["message"]
    assert alice.post("/detokenize", json={"model": "tiny", "tokens": [1] * 256}).status_code == 200
    for field in ("allowed_token_ids", "stop_token_ids"):
        e = err(alice.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                    field: [1] * 100_000}), 400, field)
        assert "vocabulary" in e["message"]
