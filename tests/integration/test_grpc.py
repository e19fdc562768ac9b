"""The gRPC front through real grpcio clients, next to HTTP on one server and one vLLM engine.

Same tokens as HTTP, streaming, cancellation and deadlines that free the
engine, uploads usable over HTTP, every status code, health and reflection.
"""

from __future__ import annotations

import io
import re
import tarfile
import time

import grpc
import pytest

from server.api.grpc.pb import adapters_pb2 as apb
from server.api.grpc.pb import adapters_pb2_grpc, inference_pb2 as ipb, inference_pb2_grpc
from tests.integration.server_proc import create_tenant

USER = ipb.ROLE_USER
# 16 x 250 tokens: about a second on a warm, idle CPU engine (the tiny model is fast), so a request cut
# after its first tokens has verifiably not run to the end: vLLM generated fewer than LONG_TOKENS.
LONG = dict(max_tokens=250, n=16, temperature=1.0, seed=1, ignore_eos=True)
LONG_TOKENS = 250 * 16


@pytest.fixture(scope="module")
def g(grpc_cluster):
    """The cluster, with alice owning adapter 'one' (a1, uploaded over gRPC) and bob owning 'bobs' (a2)."""
    channel = grpc_cluster.channel()
    grpc_cluster.inference = inference_pb2_grpc.InferenceStub(channel)
    grpc_cluster.adapters_stub = adapters_pb2_grpc.AdaptersStub(channel)
    upload(grpc_cluster, "alice", "one", "a1")
    upload(grpc_cluster, "bob", "bobs", "a2")
    yield grpc_cluster
    channel.close()


def files_stream(name: str, adapter_dir, *, chunk: int = 16 << 10, **meta):
    """Metadata, then every file in `chunk`-byte pieces (several per file: the server must join them)."""
    yield apb.UploadRequest(metadata=apb.UploadMetadata(name=name, **meta))
    for f in sorted(adapter_dir.iterdir()):
        data = f.read_bytes()
        for i in range(0, len(data), chunk):
            yield apb.UploadRequest(file=apb.FileChunk(filename=f.name, data=data[i:i + chunk]))


def archive_stream(name: str, adapter_dir, *, chunk: int = 16 << 10, **meta):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted(adapter_dir.iterdir()):
            tar.add(f, arcname=f"adapter/{f.name}")
    data = buf.getvalue()
    yield apb.UploadRequest(metadata=apb.UploadMetadata(name=name, **meta))
    for i in range(0, len(data), chunk):
        yield apb.UploadRequest(archive=data[i:i + chunk])


def upload(c, tenant: str, name: str, adapter: str) -> apb.Adapter:
    return c.adapters_stub.Upload(files_stream(name, c.adapters[adapter]), metadata=c.grpc_auth(tenant))


def generate(c, tenant: str, **req) -> list[ipb.GenerateResponse]:
    return list(c.inference.Generate(ipb.GenerateRequest(**req), metadata=c.grpc_auth(tenant)))


def chat(c, tenant: str, **req) -> list[ipb.GenerateResponse]:
    return list(c.inference.Chat(ipb.ChatRequest(**req), metadata=c.grpc_auth(tenant)))


def joined(msgs: list[ipb.GenerateResponse]) -> tuple[list[int], str]:
    return [t for m in msgs for t in m.token_ids], "".join(m.text for m in msgs)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        r = call()
        if isinstance(r, grpc.Call):  # a stream: its error comes while reading it
            list(r)
    return info.value


def trailers(err: grpc.RpcError) -> dict[str, str]:
    return dict(err.trailing_metadata() or ())


def scrape(c, name: str, **labels) -> float:
    """Sum of a /metrics family's samples whose labels include ``labels`` (0 if none do yet)."""
    samples = [re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
               for line in c.metrics().splitlines()]
    return sum(float(m[2]) for m in samples if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()))


def wait_engine_idle(c, timeout: float = 10) -> float:
    """Seconds until vLLM reports no running request; fails after ``timeout``."""
    t0 = time.monotonic()
    while (running := scrape(c, "vllm_num_requests_running")) != 0:
        assert time.monotonic() - t0 < timeout, f"vLLM still runs {running} request(s) {timeout}s later"
        time.sleep(0.1)
    return time.monotonic() - t0


# ---------------------------------------------------------------- parity with HTTP


@pytest.mark.parametrize("model", ["tiny", "tiny:one"])
def test_generate_gives_the_http_tokens(g, model):
    http = g.client("alice").completions.create(
        model=model, prompt="the date is march", max_tokens=12, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    msgs = generate(g, "alice", model=model, prompt="the date is march", max_tokens=12, temperature=0,
                    ignore_eos=True)
    ids, text = joined(msgs)
    assert ids == http.choices[0].model_extra["token_ids"] and len(ids) == 12
    assert text == http.choices[0].text
    last = msgs[-1]
    assert last.finish_reason == http.choices[0].finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == \
        (http.usage.prompt_tokens, http.usage.completion_tokens, http.usage.total_tokens)


@pytest.mark.parametrize("model", ["tiny", "tiny:one"])
def test_chat_gives_the_http_tokens(g, model):
    http = g.client("alice").chat.completions.create(
        model=model, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "march 3"}],
        max_tokens=10, temperature=0, extra_body={"return_token_ids": True, "ignore_eos": True})
    msgs = chat(g, "alice", model=model, max_tokens=10, temperature=0, ignore_eos=True,
                messages=[ipb.ChatMessage(role=ipb.ROLE_SYSTEM, content="be brief"),
                          ipb.ChatMessage(role=USER, content="march 3")])
    ids, text = joined(msgs)
    assert ids == http.choices[0].model_extra["token_ids"] and len(ids) == 10
    assert text == http.choices[0].message.content
    assert msgs[-1].usage.prompt_tokens == http.usage.prompt_tokens  # same chat template rendering


def test_adapter_and_base_differ(g):
    kw = dict(prompt="hello world convert", max_tokens=8, temperature=0, ignore_eos=True)
    assert joined(generate(g, "alice", model="tiny", **kw))[0] != joined(generate(g, "alice", model="tiny:one", **kw))[0]


def test_list_models_is_per_tenant(g):
    alice = g.inference.ListModels(ipb.ListModelsRequest(), metadata=g.grpc_auth("alice")).models
    assert [m.id for m in alice][:1] == ["tiny"] and "tiny:one" in {m.id for m in alice}
    one = next(m for m in alice if m.id == "tiny:one")
    assert (one.parent, one.owned_by, one.max_model_len) == ("tiny", "alice", 256)
    assert one.root.startswith("sha256:")
    bob = {m.id for m in g.inference.ListModels(ipb.ListModelsRequest(), metadata=g.grpc_auth("bob")).models}
    assert "tiny:one" not in bob and "tiny:bobs" in bob


# ---------------------------------------------------------------- streaming, cancellation, deadlines


def test_tokens_stream_incrementally(g):
    msgs = generate(g, "alice", model="tiny", prompt="hello", max_tokens=32, temperature=0, ignore_eos=True)
    assert len(msgs) > 1
    assert [m.HasField("usage") for m in msgs] == [False] * (len(msgs) - 1) + [True]
    assert [m.finish_reason for m in msgs] == [""] * (len(msgs) - 1) + ["length"]
    full = g.client("alice").completions.create(model="tiny", prompt="hello", max_tokens=32, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert joined(msgs)[1] == full.choices[0].text
    assert msgs[-1].usage.completion_tokens == 32


def test_n_choices_and_logprobs(g):
    msgs = generate(g, "alice", model="tiny", prompt="hello", max_tokens=4, n=3, temperature=1.0, seed=7,
                    logprobs=2, ignore_eos=True)
    for i in range(3):
        mine = [m for m in msgs if m.index == i]
        assert sum(len(m.token_ids) for m in mine) == 4 and mine[-1].finish_reason == "length"
        lps = [lp for m in mine for lp in m.logprobs]
        assert len(lps) == 4 and all(lp.logprob <= 0 and 1 <= len(lp.top) for lp in lps)
    assert msgs[-1].usage.completion_tokens == 12


def test_cancel_mid_stream_aborts_the_engine_request(g):
    cancelled = scrape(g, "loraplex_requests_total", protocol="grpc", endpoint="generate", status="cancelled")
    generated = scrape(g, "vllm_generation_tokens_total")
    stream = g.inference.Generate(ipb.GenerateRequest(model="tiny:one", prompt="hello", **LONG),
                                  metadata=g.grpc_auth("alice"))
    first = [next(stream) for _ in range(2)]
    assert all(m.token_ids for m in first)
    stream.cancel()
    wait_engine_idle(g)
    assert scrape(g, "loraplex_requests_total", protocol="grpc", endpoint="generate",
                  status="cancelled") == cancelled + 1
    assert 0 < scrape(g, "vllm_generation_tokens_total") - generated < LONG_TOKENS  # it stopped early


def test_deadline_exceeded_aborts_the_engine_request(g):
    generated = scrape(g, "vllm_generation_tokens_total")
    stream = g.inference.Generate(ipb.GenerateRequest(model="tiny", prompt="hello", **LONG),
                                  metadata=g.grpc_auth("alice"), timeout=0.5)
    received = 0
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            received += 1
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received > 0  # the deadline hit mid-stream, not before the engine started
    wait_engine_idle(g)
    assert 0 < scrape(g, "vllm_generation_tokens_total") - generated < LONG_TOKENS


def test_grpc_requests_are_counted_with_protocol_grpc(g):
    before = scrape(g, "loraplex_requests_total", protocol="grpc", endpoint="chat", status="ok")
    chat(g, "alice", model="tiny", max_tokens=2, messages=[ipb.ChatMessage(role=USER, content="hi")])
    assert scrape(g, "loraplex_requests_total", protocol="grpc", endpoint="chat", status="ok") == before + 1
    assert scrape(g, "loraplex_generation_tokens_total", protocol="grpc", tenant="alice") > 0


# ---------------------------------------------------------------- adapters


def test_upload_over_grpc_serves_over_http_and_replace_bumps_the_version(g):
    rec = upload(g, "alice", "via-grpc", "a3")
    assert (rec.name, rec.model, rec.tenant, rec.version, rec.rank) == ("via-grpc", "tiny:via-grpc", "alice", 1, 8)
    kw = dict(prompt="answer iso format 1999", max_tokens=8, temperature=0)
    http = g.client("alice").completions.create(model="tiny:via-grpc", extra_body={"return_token_ids": True,
                                                                                   "ignore_eos": True}, **kw)
    assert http.choices[0].model_extra["token_ids"] == joined(generate(g, "alice", model="tiny:via-grpc",
                                                                       ignore_eos=True, **kw))[0]

    new = g.adapters_stub.Replace(archive_stream("via-grpc", g.adapters["a4"]), metadata=g.grpc_auth("alice"))
    assert (new.version, new.rank) == (2, 16) and new.digest != rec.digest
    assert g.adapters_stub.Get(apb.AdapterRef(name="via-grpc"), metadata=g.grpc_auth("alice")).version == 2
    after = g.client("alice").completions.create(model="tiny:via-grpc", extra_body={"return_token_ids": True,
                                                                                    "ignore_eos": True}, **kw)
    assert after.choices[0].model_extra["token_ids"] != http.choices[0].model_extra["token_ids"]

    pinned = g.adapters_stub.Pin(apb.AdapterRef(name="via-grpc"), metadata=g.grpc_auth("alice"))
    assert pinned.pinned and pinned.residency == "loaded"
    assert not g.adapters_stub.Unpin(apb.AdapterRef(name="via-grpc"), metadata=g.grpc_auth("alice")).pinned
    listed = g.adapters_stub.List(apb.ListAdaptersRequest(), metadata=g.grpc_auth("alice")).adapters
    assert [a.name for a in listed] == ["one", "via-grpc"]
    gone = g.adapters_stub.Delete(apb.AdapterRef(name="via-grpc"), metadata=g.grpc_auth("alice"))
    assert (gone.name, gone.versions) == ("via-grpc", 1)  # v1 was reclaimed once it drained
    assert g.client("alice").models.list().data[-1].id == "tiny:one"


def test_admin_acts_on_another_tenant(g):
    listed = g.adapters_stub.List(apb.ListAdaptersRequest(tenant="bob"), metadata=g.grpc_auth("admin")).adapters
    assert [(a.tenant, a.name) for a in listed] == [("bob", "bobs")]


# ---------------------------------------------------------------- errors


def test_not_found_is_the_same_for_missing_and_another_tenants_adapter(g):
    def gen(model):
        return error_of(lambda: g.inference.Generate(ipb.GenerateRequest(model=model, prompt="hi", max_tokens=2),
                                                     metadata=g.grpc_auth("alice")))

    foreign, missing = gen("tiny:bobs"), gen("tiny:nope")
    assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.details().replace("bobs", "X") == missing.details().replace("nope", "X")
    assert trailers(foreign) == trailers(missing) == {"loraplex-code": "model_not_found", "loraplex-field": "model"}
    for method in ("Get", "Pin", "Delete"):
        call = getattr(g.adapters_stub, method)
        f = error_of(lambda: call(apb.AdapterRef(name="bobs"), metadata=g.grpc_auth("alice")))
        m = error_of(lambda: call(apb.AdapterRef(name="nope"), metadata=g.grpc_auth("alice")))
        assert f.code() == m.code() == grpc.StatusCode.NOT_FOUND, method
        assert f.details().replace("bobs", "X") == m.details().replace("nope", "X")
    assert g.adapters_stub.Get(apb.AdapterRef(name="bobs"), metadata=g.grpc_auth("bob")).version == 1


def test_unauthenticated_without_or_with_a_bad_key(g):
    req = ipb.GenerateRequest(model="tiny", prompt="hi", max_tokens=2)
    none = error_of(lambda: g.inference.Generate(req))
    bad = error_of(lambda: g.inference.Generate(req, metadata=(("authorization", "Bearer lpx_wrong"),)))
    assert none.code() == bad.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in none.details() and "invalid API key" in bad.details()
    upload_err = error_of(lambda: g.adapters_stub.Upload(files_stream("x", g.adapters["a1"]),
                                                         metadata=(("authorization", "Bearer lpx_wrong"),)))
    assert upload_err.code() == grpc.StatusCode.UNAUTHENTICATED


def test_permission_denied_for_another_tenant_without_admin(g):
    err = error_of(lambda: g.adapters_stub.List(apb.ListAdaptersRequest(tenant="bob"), metadata=g.grpc_auth("alice")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details().startswith("tenant: ") and trailers(err)["loraplex-field"] == "tenant"
    err = error_of(lambda: g.adapters_stub.Upload(files_stream("x", g.adapters["a1"], tenant="bob"),
                                                  metadata=g.grpc_auth("alice")))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("field, req", [
    ("max_tokens", dict(max_tokens=1000)),  # beyond the 256-token context
    ("max_tokens", dict(max_tokens=0)),
    ("temperature", dict(temperature=2.5)),
    ("top_p", dict(top_p=0.0)),
    ("n", dict(n=129)),
    ("stop", dict(stop=["a"] * 65)),
    ("logprobs", dict(logprobs=21)),
    ("prompt", dict(prompt="")),
    ("model", dict(model="")),
])
def test_invalid_argument_names_the_field(g, field, req):
    req = {"model": "tiny", "prompt": "hello", **req}
    err = error_of(lambda: g.inference.Generate(ipb.GenerateRequest(**req), metadata=g.grpc_auth("alice")))
    want = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT  # "" is no model
    assert err.code() == want
    assert err.details().startswith(f"{field}: ") and trailers(err)["loraplex-field"] == field


def test_long_repeated_fields_are_refused_by_their_length(g):
    """Counted before a Python object is made of each item, answered in a line (issue 21): 2 million
    ids, a million stop strings, 300,000 messages, each a few MiB and well under the message cap."""
    auth = g.grpc_auth("alice")
    for field, call in (
        ("prompt_token_ids", lambda: g.inference.Generate(
            ipb.GenerateRequest(model="tiny", prompt_token_ids=[5] * 2_000_000), metadata=auth)),
        ("stop", lambda: g.inference.Generate(
            ipb.GenerateRequest(model="tiny", prompt="hello", stop=["a"] * 1_000_000), metadata=auth)),
        ("messages", lambda: g.inference.Chat(
            ipb.ChatRequest(model="tiny", messages=[ipb.ChatMessage(role=ipb.ROLE_USER, content="hi")] * 300_000),
            metadata=auth)),
    ):
        err = error_of(call)
        assert (err.code(), trailers(err)["loraplex-field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field)
        assert len(err.details()) < 200, err.details()[:300]
    assert joined(generate(g, "alice", model="tiny", prompt="hello", max_tokens=2))[0]


def test_invalid_chat_and_upload_name_the_field(g):
    err = error_of(lambda: chat(g, "alice", model="tiny", max_tokens=2))
    assert (err.code(), trailers(err)["loraplex-field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "messages")
    err = error_of(lambda: chat(g, "alice", model="tiny", max_tokens=2, messages=[ipb.ChatMessage(content="hi")]))
    assert trailers(err)["loraplex-field"] == "messages[0].role"
    no_meta = iter([apb.UploadRequest(file=apb.FileChunk(filename="adapter_config.json", data=b"{}"))])
    err = error_of(lambda: g.adapters_stub.Upload(no_meta, metadata=g.grpc_auth("alice")))
    assert (err.code(), trailers(err)["loraplex-field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "metadata")
    pickle = iter([apb.UploadRequest(metadata=apb.UploadMetadata(name="pkl")),
                   apb.UploadRequest(file=apb.FileChunk(filename="adapter_model.bin", data=b"\x80\x04"))])
    err = error_of(lambda: g.adapters_stub.Upload(pickle, metadata=g.grpc_auth("alice")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in err.details()
    assert trailers(err)["loraplex-code"] == "adapter_rejected"


def test_already_exists_for_a_second_upload_of_a_name(g):
    err = error_of(lambda: upload(g, "alice", "one", "a2"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and trailers(err)["loraplex-field"] == "name"
    assert g.adapters_stub.Get(apb.AdapterRef(name="one"), metadata=g.grpc_auth("alice")).version == 1


def test_resource_exhausted_with_retry_after(g):
    key = create_tenant(g.server.data_dir, "grpc-slow", "--rpm", "2")
    auth = (("authorization", f"Bearer {key}"),)
    codes = []
    for _ in range(4):
        try:
            g.inference.ListModels(ipb.ListModelsRequest(), metadata=auth)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            last = err
    assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert int(trailers(last)["retry-after"]) >= 1 and trailers(last)["loraplex-code"] == "rate_limit_exceeded"


# ---------------------------------------------------------------- health and reflection


def test_health_and_reflection(g):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with g.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraplex.v1.Inference", "loraplex.v1.Adapters"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        assert {"loraplex.v1.Inference", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= set(db.get_services())
        generate_rpc = DescriptorPool(db).FindServiceByName("loraplex.v1.Inference").methods_by_name["Generate"]
        assert generate_rpc.server_streaming and generate_rpc.output_type.full_name == "loraplex.v1.GenerateResponse"


def test_x_request_id_metadata_round_trips(g):
    call = g.inference.Generate(ipb.GenerateRequest(model="tiny", prompt="hi", max_tokens=2),
                                metadata=(*g.grpc_auth("alice"), ("x-request-id", "grpc-trace-7")))
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-trace-7"
    assert list(call)
    call = g.inference.Generate(ipb.GenerateRequest(model="tiny", prompt="hi", max_tokens=2),
                                metadata=g.grpc_auth("alice"))
    assert dict(call.initial_metadata())["x-request-id"].startswith("grpc-")
    err = error_of(lambda: g.inference.Generate(ipb.GenerateRequest(model="tiny", prompt="hi", max_tokens=2),
                                                metadata=(*g.grpc_auth("alice"), ("x-request-id", "bad id"))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and trailers(err)["loraplex-field"] == "X-Request-Id"
