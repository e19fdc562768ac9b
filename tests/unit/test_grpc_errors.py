"""Service errors -> gRPC status codes: the table, and a real grpc.aio server over a real Service.

The in-process server runs the real servicers, interceptor, tenants, rate
limiter and registry; its engine is one that has not started, which is how
UNAVAILABLE (EngineNotReady: retry, as gRPC clients do for this code) is reached
without vLLM.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from server import errors as e
from server.adapters.registry import AdapterRegistry
from server.adapters.residency import AdapterCacheFull
from server.adapters.store import AdapterStore
from server.api.grpc.errors import CODES, code_of, details_of, trailers_of
from server.api.grpc.pb import adapters_pb2 as apb
from server.api.grpc.pb import adapters_pb2_grpc, inference_pb2 as ipb, inference_pb2_grpc
from server.api.http.errors import STATUS
from server.config import Settings
from server.db import Database
from server.metrics import Metrics
from server.service import Service
from server.tenants import Quotas, TenantStore
from tests.adapter_files import tiny_base

S = grpc.StatusCode


@pytest.mark.parametrize("exc, code", [
    (e.InvalidArgument("bad", field="max_tokens"), S.INVALID_ARGUMENT),
    (e.AdapterRejected("pickle", field="files"), S.INVALID_ARGUMENT),
    (e.Unauthenticated("no key"), S.UNAUTHENTICATED),
    (e.PermissionDenied("admins only", field="tenant"), S.PERMISSION_DENIED),
    (e.NotFound("The model `x` does not exist.", field="model"), S.NOT_FOUND),
    (e.Conflict("exists", field="name"), S.ALREADY_EXISTS),
    (e.RateLimited("slow down", retry_after=0.2), S.RESOURCE_EXHAUSTED),
    (e.QuotaExceeded("too many adapters", field="name"), S.RESOURCE_EXHAUSTED),
    (e.EngineNotReady("the engine is not ready yet"), S.UNAVAILABLE),
        (e.PayloadTooLarge("the upload is larger than 10 bytes", field="files"), S.RESOURCE_EXHAUSTED),
        (e.AdapterLoadFailed("adapter x could not be loaded", field="model"), S.INTERNAL),
    (AdapterCacheFull("every adapter is pinned"), S.UNAVAILABLE),
])
def test_every_service_error_has_its_code(exc, code):
    assert code_of(exc) == code


def test_the_table_covers_what_http_maps():
    assert set(CODES) == set(STATUS)
    assert code_of(e.LoraplexError("an error nobody mapped")) == S.INTERNAL  # as HTTP answers 500


def test_details_and_trailers_name_the_field_and_when_to_retry():
    exc = e.InvalidArgument("max_tokens is 300, but the prompt leaves room for 250", field="max_tokens")
    assert details_of(exc) == "max_tokens: max_tokens is 300, but the prompt leaves room for 250"
    assert dict(trailers_of(exc)) == {"loraplex-code": "invalid_argument", "loraplex-field": "max_tokens"}
    assert dict(trailers_of(e.RateLimited("slow down", retry_after=0.2)))["retry-after"] == "1"
    assert dict(trailers_of(e.RateLimited("slow down", retry_after=7.5)))["retry-after"] == "8"
    assert "retry-after" not in dict(trailers_of(e.QuotaExceeded("too many adapters", field="name")))
    assert details_of(e.Unauthenticated("invalid API key")) == "invalid API key"


class UnstartedEngine:
    """An engine before ``start()``: not ready, and nothing may be submitted to it."""

    ready = False

    async def generate(self, *args, **kwargs):
        raise AssertionError("a request reached an engine that is not ready")
        yield


@pytest.fixture
def service(tmp_path) -> Service:
    db = Database(tmp_path / "registry.sqlite3")
    settings = Settings(data_dir=tmp_path, max_model_len=256)
    return Service(settings, base=None, base_spec=tiny_base(), engine=UnstartedEngine(), tokenizer=None,
                   tenants=TenantStore(db), registry=AdapterRegistry(db), store=AdapterStore(tmp_path / "adapters"),
                   metrics=Metrics())


def test_a_real_grpc_server_maps_service_errors(service):
    key = service.tenants.create("acme")
    slow = service.tenants.create("slow", quotas=Quotas(requests_per_minute=1))

    async def scenario() -> dict[str, grpc.aio.AioRpcError]:
        from server.api.grpc.server import start_grpc

        server = await start_grpc(service, "127.0.0.1", 0)
        got = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                inference, adapters = inference_pb2_grpc.InferenceStub(channel), adapters_pb2_grpc.AdaptersStub(channel)

                async def fails(name, call):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        r = call()
                        await (r.read() if isinstance(r, grpc.aio.UnaryStreamCall) else r)
                    got[name] = info.value

                def auth(k):
                    return (("authorization", f"Bearer {k}"),)

                ok = ipb.GenerateRequest(model="tiny-llama", prompt_token_ids=[1, 2, 3], max_tokens=4)
                await fails("not ready", lambda: inference.Generate(ok, metadata=auth(key)))
                await fails("no key", lambda: inference.Generate(ok))
                hot = ipb.GenerateRequest(model="tiny-llama", prompt_token_ids=[1, 2, 3], temperature=3.0)
                await fails("temperature", lambda: inference.Generate(hot, metadata=auth(key)))
                await fails("missing", lambda: adapters.Get(apb.AdapterRef(name="nope"), metadata=auth(key)))
                await adapters.List(apb.ListAdaptersRequest(), metadata=auth(slow))
                await fails("rate", lambda: adapters.List(apb.ListAdaptersRequest(), metadata=auth(slow)))
        finally:
            await server.stop(grace=None)
        return got

    got = asyncio.run(scenario())
    assert got["not ready"].code() == S.UNAVAILABLE
    assert got["not ready"].details() == "the engine is not ready yet"
    assert dict(got["not ready"].trailing_metadata())["loraplex-code"] == "engine_not_ready"
    assert got["no key"].code() == S.UNAUTHENTICATED
    assert got["temperature"].code() == S.INVALID_ARGUMENT
    assert got["temperature"].details() == "temperature: must be between 0 and 2, got 3.0"
    assert dict(got["temperature"].trailing_metadata())["loraplex-field"] == "temperature"
    assert got["missing"].code() == S.NOT_FOUND and got["missing"].details().startswith("model: ")
    assert got["rate"].code() == S.RESOURCE_EXHAUSTED
    assert int(dict(got["rate"].trailing_metadata())["retry-after"]) >= 1
