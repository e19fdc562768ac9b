"""gRPC messages -> service types: the HTTP API's sampling bounds and defaults, and upload streams."""

from __future__ import annotations

import asyncio

import pytest

from server.api.grpc import protocol
from server.api.grpc.pb import adapters_pb2 as apb
from server.api.grpc.pb import inference_pb2 as ipb
from server.api.http.protocol import ChatCompletionRequest, CompletionRequest
from server.errors import InvalidArgument, PayloadTooLarge

# Each field at and just past its bounds: both fronts check them in one place (Sampling), and
# must agree on every one.
EDGES = [("max_tokens", v) for v in (0, 1, 4096)] + [("temperature", v) for v in (0.0, 2.0, 2.01)] + \
        [("top_p", v) for v in (0.0, 1e-9, 1.0, 1.01)] + [("n", v) for v in (0, 1, 128, 129)] + \
        [("logprobs", v) for v in (0, 20, 21)] + [("stop", ["a"] * k) for k in (64, 65)] + [("seed", 2**40)]


def _http(field, value):
    req = CompletionRequest(model="m", prompt="p", **{field: value})
    return req.sampling(max_tokens=req.max_tokens, logprobs=req.logprobs)


@pytest.mark.parametrize("field, value", EDGES)
def test_sampling_bounds_match_the_http_api(field, value):
    try:
        _http(field, value)
        http_ok = True
    except InvalidArgument as exc:
        http_ok = False
        assert exc.field == field
    try:
        protocol.sampling(ipb.GenerateRequest(model="m", prompt="p", **{field: value}))
        grpc_ok = True
    except InvalidArgument as exc:
        grpc_ok = False
        assert exc.field == field
    assert grpc_ok == http_ok


def test_unset_fields_take_the_http_defaults():
    http = CompletionRequest(model="m", prompt="p")
    assert protocol.sampling(ipb.GenerateRequest(model="m", prompt="p")) == \
        http.sampling(max_tokens=http.max_tokens, logprobs=http.logprobs)
    http_chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert protocol.sampling(ipb.ChatRequest(model="m")) == \
        http_chat.sampling(max_tokens=http_chat.output_tokens(), logprobs=None)
    chat = ipb.ChatRequest(model="m", max_tokens=5, temperature=0, stop=["x"], seed=3, logprobs=2, ignore_eos=True)
    s = protocol.sampling(chat)
    assert (s.max_tokens, s.temperature, s.stop, s.seed, s.logprobs, s.ignore_eos) == (5, 0.0, ("x",), 3, 2, True)


def test_chat_messages_need_a_role():
    ok = ipb.ChatRequest(messages=[ipb.ChatMessage(role=ipb.ROLE_SYSTEM, content="be brief"),
                                   ipb.ChatMessage(role=ipb.ROLE_USER, content="hi")])
    assert protocol.messages(ok, 2) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgument) as info:
        protocol.messages(ipb.ChatRequest(messages=[ipb.ChatMessage(role=ipb.ROLE_USER), ipb.ChatMessage()]), 2)
    assert info.value.field == "messages[1].role" and "ROLE_UNSPECIFIED" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        protocol.messages(ipb.ChatRequest(), 2)
    assert info.value.field == "messages"
    with pytest.raises(InvalidArgument) as info:
        protocol.messages(ok, 1)
    assert info.value.field == "messages" and "at most 1 messages (--max-request-values)" in info.value.message


async def _stream(*msgs):
    for m in msgs:
        yield m


def read(*msgs, tmp, max_bytes: int = 1 << 20):
    """Run an Upload stream through the front's readers into a staging dir: (metadata, staged)."""
    from server.adapters.staging import StagedUpload

    async def main():
        stream = aiter(_stream(*msgs))
        meta = await protocol.upload_metadata(stream, 30)
        staged = StagedUpload(tmp, max_bytes=max_bytes)
        try:
            await protocol.upload_body(stream, staged, 30)
        finally:
            staged.abort()
        return meta, staged

    return asyncio.run(main())


META = apb.UploadRequest(metadata=apb.UploadMetadata(name="bot", tenant="acme"))


def chunk(name: str, data: bytes) -> apb.UploadRequest:
    return apb.UploadRequest(file=apb.FileChunk(filename=name, data=data))


def test_file_chunks_are_joined_per_file_in_order(tmp_path):
    meta, _ = read(META, chunk("adapter_config.json", b"{\"r\":"), chunk("adapter_model.safetensors", b"AB"),
                   chunk("adapter_config.json", b" 8}"), chunk("adapter_model.safetensors", b"CD"), tmp=tmp_path)
    assert (meta.name, protocol.tenant(meta), meta.replace) == ("bot", "acme", False)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == {"adapter_config.json": b"{\"r\": 8}",
                                                                    "adapter_model.safetensors": b"ABCD"}


def test_archive_chunks_are_joined(tmp_path):
    meta, _ = read(apb.UploadRequest(metadata=apb.UploadMetadata(name="bot")),
                   apb.UploadRequest(archive=b"\x1f\x8b"), apb.UploadRequest(archive=b"rest"), tmp=tmp_path)
    assert protocol.tenant(meta) is None
    assert [f.read_bytes() for f in tmp_path.iterdir()] == [b"\x1f\x8brest"]


@pytest.mark.parametrize("msgs, field", [
    ((), "metadata"),
    ((chunk("adapter_config.json", b"{}"),), "metadata"),
    ((META, META), "metadata"),
    ((META,), "files"),
    ((META, chunk("adapter_config.json", b"{}"), apb.UploadRequest(archive=b"x")), "archive"),
])
def test_malformed_upload_streams_name_the_field(msgs, field, tmp_path):
    with pytest.raises(InvalidArgument) as info:
        read(*msgs, tmp=tmp_path)
    assert info.value.field == field


def test_an_oversized_upload_is_refused_while_streaming(tmp_path):
    with pytest.raises(PayloadTooLarge):
        read(META, chunk("adapter_model.safetensors", b"x" * 6), chunk("adapter_model.safetensors", b"x" * 6),
             tmp=tmp_path, max_bytes=10)


def test_an_upload_that_goes_silent_is_refused_not_held(tmp_path):
    """One chunk, then silence: refused after the gap (--body-timeout-s), as a stalled HTTP body is,
    instead of holding a staging directory and a file handle for as long as the client likes."""
    from server.adapters.staging import StagedUpload
    from server.errors import RequestTimeout

    async def silent_after(*msgs):
        for m in msgs:
            yield m
        await asyncio.Event().wait()  # never sends again, never ends

    async def main():
        stream = aiter(silent_after(META, chunk("adapter_config.json", b"{}")))
        await protocol.upload_metadata(stream, 0.2)
        staged = StagedUpload(tmp_path, max_bytes=1 << 20)
        try:
            with pytest.raises(RequestTimeout) as info:
                await protocol.upload_body(stream, staged, 0.2)
        finally:
            staged.abort()
        assert info.value.field == "body" and "--body-timeout-s" in info.value.message
        with pytest.raises(RequestTimeout):  # silent before its metadata, too
            await protocol.upload_metadata(aiter(silent_after()), 0.2)

    asyncio.run(main())
