"""loraplex on Ray Serve (server/cluster): `python -m server --replicas 2` starts a real local Ray
cluster with two engine replicas (each its own vLLM engine on the tiny model) behind one ingress,
over one SQLite registry and one local store. Driven with the stock openai client and httpx."""

from __future__ import annotations

import collections
import json
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.integration.server_proc import (ServerProcess, create_tenant, free_port, raw_request, request_head,
                                          upload_head)

REPLICA = "x-loraplex-replica"


@pytest.fixture(scope="module")
def ray_cluster(tiny_base, tmp_path_factory):
    data = tmp_path_factory.mktemp("ray-data")
    keys = {name: create_tenant(data, name) for name in ("alice", "bob")}
    keys["carol"] = create_tenant(data, "carol", "--max-adapters", "1")
    grpc_port = free_port()
    server = ServerProcess(tiny_base, data, "--replicas", "2", "--replica-max-ongoing-requests", "4",
                           "--max-loras", "2", "--max-cpu-loras", "4", "--grpc-port", str(grpc_port),
                           log=tmp_path_factory.mktemp("ray-logs") / "ray.log")
    server.env = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}  # see test_parallel_uploads_pass_the_ingress_in_pieces
    server.start(timeout=400)
    server.keys, server.grpc_port = keys, grpc_port
    yield server
    server.stop()


def http(server, tenant: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=120,
                        headers={"Authorization": f"Bearer {server.keys[tenant]}"})


def upload(server, name: str, adapter, *, method: str = "POST", tenant: str = "alice") -> httpx.Response:
    files = [("files", (f.name, f.read_bytes())) for f in sorted(adapter.iterdir()) if f.is_file()]
    with http(server, tenant) as h:
        if method == "POST":
            return h.post("/v1/adapters", data={"name": name}, files=files)
        return h.put(f"/v1/adapters/{name}", files=files)


def complete(server, model: str, *, tenant: str = "alice", max_tokens: int = 8) -> httpx.Response:
    with http(server, tenant) as h:
        return h.post("/v1/completions", json={"model": model, "prompt": "the date is", "max_tokens": max_tokens,
                                               "temperature": 0, "ignore_eos": True, "return_token_ids": True})


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def is_engine_core(p: psutil.Process) -> bool:
    """vLLM titles its engine core ``VLLM::EngineCore``. setproctitle rewrites the command line
    where it can, and always sets the 15-character name (``VLLM::EngineCor``). In one CI run neither
    replica's command line carried the title for four minutes, while both engines served: the
    name is checked too."""
    return "EngineCor" in p.name() or "EngineCore" in " ".join(p.cmdline())


def every_engine_core() -> list[str]:
    """Each engine-core process on the host with its status and ancestors: what a failed wait for a
    replica's engine saw (once in CI, a replacement replica served while the wait found no engine
    under the server's process tree)."""
    out = []
    for p in psutil.process_iter():
        try:
            if is_engine_core(p):
                chain = " <- ".join(f"{a.pid}:{' '.join(a.cmdline())[:40]}" for a in p.parents()[:4])
                out.append(f"{p.pid} ({p.status()}) <- {chain}")
        except psutil.Error as e:
            out.append(f"{p.pid}: {type(e).__name__}")
    return out


def engine_cores(server) -> list[psutil.Process]:
    """vLLM's engine-core processes under the replicas (running ones: a killed one is a zombie
    until its replica reaps it)."""
    cores = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if is_engine_core(p) and p.status() != psutil.STATUS_ZOMBIE:
                cores.append(p)
        except psutil.Error:
            continue
    return cores


def test_the_openai_sdk_against_the_cluster(ray_cluster, adapter_dirs):
    assert upload(ray_cluster, "sdk", adapter_dirs["a1"]).status_code == 201
    client = openai.OpenAI(base_url=f"{ray_cluster.url}/v1", api_key=ray_cluster.keys["alice"], max_retries=0)
    assert {m.id for m in client.models.list()} >= {"tiny", "tiny:sdk"}
    chat = client.chat.completions.create(model="tiny:sdk", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    text = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert text.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="tiny:sdk", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == sum(1 for c in chunks if c.choices and c.choices[0].delta.content
                                                     is not None) or chunks[-1].usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="tiny:missing", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-3)
    assert e.value.body["param"] == "temperature"
    bad = openai.OpenAI(base_url=f"{ray_cluster.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_tenants_are_isolated_across_replicas(ray_cluster, adapter_dirs):
    assert upload(ray_cluster, "private", adapter_dirs["a2"]).status_code == 201
    for _ in range(4):  # whichever replica answers
        r = complete(ray_cluster, "tiny:private", tenant="bob")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with http(ray_cluster, "bob") as h:
        assert "tiny:private" not in {m["id"] for m in h.get("/v1/models").json()["data"]}


def test_a_clients_mistake_is_a_4xx_through_the_ingress(ray_cluster):
    """Over the body cap while it arrives (no Content-Length), JSON nested past the parser's stack,
    and large bodies that are one bad list or a million small ones: 413 and 400s naming the field
    from the ingress, as from the single server (the first two were 500s), and the ingress serves on."""
    def nine_mib():
        for _ in range(9):
            yield b" " * (1 << 20)

    with http(ray_cluster) as h:
        r = h.post("/v1/completions", content=nine_mib(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
        r = h.post("/v1/completions", content=b"[" * 200_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        # Bodies that held the loop for seconds (issue 21), "model" last so the ingress reads them through.
        for prompt, param in (([1.5] * 200_000, "prompt"), ([[1]] * 1_000_000, "body")):
            r = h.post("/v1/completions", content=json.dumps({"prompt": prompt, "model": "tiny"}).encode(),
                       headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert complete(ray_cluster, "tiny").status_code == 200


def test_an_upload_is_refused_at_the_ingress_before_its_files(ray_cluster, adapter_dirs):
    """A taken name, a replace of an adapter that does not exist and a full quota, each in a
    2 GiB upload of which the client sends the form's name and 1 MiB of files: the ingress
    answers as soon as the form names the adapter, with the single server's check. It held every
    upload whole before forwarding it, and answered these with a 408 when the client stalled."""
    import grpc

    from server.api.grpc.pb import adapters_pb2 as apb, adapters_pb2_grpc

    assert upload(ray_cluster, "held", adapter_dirs["a1"]).status_code == 201
    assert upload(ray_cluster, "only", adapter_dirs["a1"], tenant="carol").status_code == 201
    for tenant, method, path, name, status, code in (
            ("alice", "POST", "/v1/adapters", "held", 409, "conflict"),
            ("alice", "PUT", "/v1/adapters/absent", None, 404, "model_not_found"),
            ("carol", "POST", "/v1/adapters", "second", 429, "quota_exceeded")):
        head = request_head(method, path, 2 << 30, ray_cluster.keys[tenant], "multipart/form-data; boundary=b")
        got, _, body, _ = raw_request(ray_cluster.port, head, upload_head(name) + b"\0" * (1 << 20), wait=60)
        error = json.loads(body)["error"]
        assert (got, error["code"]) == (status, code), body
    # a form padded past its fields (128 KiB) is refused by the ingress too, not parsed for minutes
    padded = b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\npadded\r\n--b' + b" " * (1 << 20)
    head = request_head("POST", "/v1/adapters", 2 << 30, ray_cluster.keys["alice"], "multipart/form-data; boundary=b")
    got, _, body, _ = raw_request(ray_cluster.port, head, padded, wait=60)
    assert got == 400 and json.loads(body)["error"]["param"] == "files", body
    # gRPC: the first message names the adapter; the files never come
    stop = threading.Event()

    def stalled():
        yield apb.UploadRequest(metadata=apb.UploadMetadata(name="held"))
        yield apb.UploadRequest(file=apb.FileChunk(filename="adapter_model.safetensors", data=b"\0" * (1 << 20)))
        stop.wait(60)

    try:
        with grpc.insecure_channel(f"127.0.0.1:{ray_cluster.grpc_port}") as channel:
            with pytest.raises(grpc.RpcError) as e:
                adapters_pb2_grpc.AdaptersStub(channel).Upload(
                    stalled(), metadata=(("authorization", f"Bearer {ray_cluster.keys['alice']}"),), timeout=60)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
    finally:
        stop.set()


def test_parallel_uploads_pass_the_ingress_in_pieces(ray_cluster):
    """Four uploads of 96 MiB at once (--max-uploads; two tenants, two each), over HTTP and then
    over gRPC, reach the replicas, which refuse them (zeros, no safetensors header), while the
    ingress holds less than half of them at any time: it puts each into Ray's object store 1 MiB at
    a time as it arrives (what it holds is what arrives faster than that, not the upload's size).
    It held each one whole before, two or three copies of it. Measured as
    benchmarks/ingress_uploads.py measures it: the ingress's RssAnon, with the fixture's
    MALLOC_MMAP_THRESHOLD_ so that glibc returns a freed piece at once."""
    from benchmarks.ingress_uploads import form, measure, upload_over_grpc, upload_over_http

    size = 96 << 20
    files, tenants = form(size), ("alice", "alice", "bob", "bob")

    def over_http(i: int) -> int:
        return upload_over_http(ray_cluster.url, ray_cluster.keys[tenants[i]], f"big-{i}", files)

    def over_grpc(i: int) -> str:
        return upload_over_grpc(ray_cluster.grpc_port, ray_cluster.keys[tenants[i]], f"big-{i}", size)

    for send, refused in ((over_http, 400), (over_grpc, "INVALID_ARGUMENT")):
        run = measure(ray_cluster, send, 4)
        assert run["answers"] == [refused] * 4
        assert run["peak_growth_mib"] < 2 * size / 2**20, f"{send.__name__}: the ingress grew by {run}"
    assert complete(ray_cluster, "tiny").status_code == 200


def test_an_adapter_keeps_to_its_replica_and_spills_over_when_it_is_saturated(ray_cluster, adapter_dirs):
    assert upload(ray_cluster, "affine", adapter_dirs["a3"]).status_code == 201
    first = complete(ray_cluster, "tiny:affine")
    home = first.headers[REPLICA]
    served = [complete(ray_cluster, "tiny:affine").headers[REPLICA] for _ in range(10)]
    assert served == [home] * 10
    # A body over 64 KiB with "model" last: the ingress reads it off its loop, and routes the same.
    padded = ('{"prompt": "the date is", "max_tokens": 2,' + " " * (100 << 10) + '"model": "tiny:affine"}').encode()
    with http(ray_cluster) as h:
        for _ in range(10):
            r = h.post("/v1/completions", content=padded, headers={"Content-Type": "application/json"})
            assert r.status_code == 200 and r.headers[REPLICA] == home, r.text
    # Base requests go anywhere: both replicas answer some.
    assert len({complete(ray_cluster, "tiny").headers[REPLICA] for _ in range(16)}) == 2
    # 16 at once, each long, on a replica that takes 4 at a time: Ray sends some to the other.
    seen = collections.Counter()

    def one():
        r = complete(ray_cluster, "tiny:affine", max_tokens=48)
        assert r.status_code == 200, r.text
        seen[r.headers[REPLICA]] += 1

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(seen.values()) == 16 and len(seen) == 2, seen
    assert seen[home] >= 4, seen


def test_replace_and_delete_across_replicas(ray_cluster, adapter_dirs):
    assert upload(ray_cluster, "swap", adapter_dirs["a1"]).status_code == 201
    old = tokens(complete(ray_cluster, "tiny:swap"))
    failures, stop = [], threading.Event()

    def client():
        with http(ray_cluster) as h:
            while not stop.is_set():
                with h.stream("POST", "/v1/completions", json={"model": "tiny:swap", "prompt": "hi",
                                                               "max_tokens": 12, "stream": True}) as r:
                    lines = [line for line in r.iter_lines() if line]
                    if r.status_code != 200 or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
                        failures.append((r.status_code, lines[-2:]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2)
    r = upload(ray_cluster, "swap", adapter_dirs["a2"], method="PUT")
    assert r.status_code == 200, r.text
    # Acknowledged: from now on no replica answers with the old version.
    answers = [complete(ray_cluster, "tiny:swap") for _ in range(12)]
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    new = {json.dumps(tokens(a)) for a in answers}
    assert len(new) == 1 and json.loads(new.pop()) != old
    with http(ray_cluster) as h:
        assert h.delete("/v1/adapters/swap").status_code == 200
    for _ in range(6):  # neither replica serves it once the delete is acknowledged
        assert complete(ray_cluster, "tiny:swap").status_code == 404


def test_killing_one_replicas_engine_mid_stream(ray_cluster, adapter_dirs):
    assert upload(ray_cluster, "survivor", adapter_dirs["a4"]).status_code == 201
    before = tokens(complete(ray_cluster, "tiny:survivor"))
    def registered() -> list[tuple]:  # residency is each replica's own: not compared
        with http(ray_cluster) as h:
            return [(a["id"], a["version"], a["digest"]) for a in h.get("/v1/adapters").json()["data"]]

    adapters_before = registered()
    # Both replicas' engines, once they are up: on a loaded host Ray may be restarting a replica whose
    # health check was slow (seen once in CI: no engine core at all for a moment).
    deadline = time.time() + 240
    while len(cores := engine_cores(ray_cluster)) < 2 and time.time() < deadline:
        time.sleep(1)
    assert len(cores) == 2, [(p.pid, p.name(), " ".join(p.cmdline())[:80])
                             for p in psutil.Process(ray_cluster.proc.pid).children(recursive=True)]
    replicas = {complete(ray_cluster, "tiny").headers[REPLICA] for _ in range(16)}
    assert len(replicas) == 2
    outcomes, started = [], threading.Semaphore(0)

    def stream():
        try:
            with httpx.Client(base_url=ray_cluster.url, timeout=60,
                              headers={"Authorization": f"Bearer {ray_cluster.keys['alice']}"}) as h:
                with h.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 240,
                                                               "ignore_eos": True, "stream": True}) as r:
                    lines = []
                    for line in r.iter_lines():
                        if line:
                            lines.append(line)
                            if len(lines) == 1:
                                started.release()
            errors = [json.loads(x[6:])["error"] for x in lines if x.startswith("data: {") and '"error"' in x]
            outcomes.append(("error", errors[0]["code"]) if errors else ("ok", lines[-1]))
        except httpx.TimeoutException:
            outcomes.append(("hang", None))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in threads:  # every stream has its first token: all 8 are in flight, on both replicas
        assert started.acquire(timeout=60)
    victim = cores[0]
    victim.kill()
    for t in threads:
        t.join()
    assert len(outcomes) == 8 and not [o for o in outcomes if o[0] == "hang"], outcomes
    assert all(o == ("ok", "data: [DONE]") or o[0] == "error" for o in outcomes), outcomes
    # The kill hit streams in flight (the victim's), and they ended with a retryable error.
    assert {o[1] for o in outcomes if o[0] == "error"} & {"engine_not_ready", "replica_lost"}, outcomes
    # New requests are served (by the other replica, or retried there), while Ray replaces the dead one.
    for _ in range(8):
        assert complete(ray_cluster, "tiny").status_code == 200
    # Ray replaces the replica whose engine died: a replica that was not there before serves. (Told
    # by what serves, not by process names: twice in CI a replacement served while its engine
    # process did not show under the name vLLM gives it.)
    deadline, fresh = time.time() + 240, set()
    while not fresh and time.time() < deadline:
        fresh = {r.headers.get(REPLICA) for r in (complete(ray_cluster, "tiny") for _ in range(8))
                 if r.status_code == 200} - replicas
        if not fresh:
            time.sleep(2)
    assert fresh, f"Ray did not bring the replica back; engine cores on this host: {every_engine_core()}"
    # Nothing in the registry or the store was damaged.
    assert registered() == adapters_before
    assert tokens(complete(ray_cluster, "tiny:survivor")) == before


def test_grpc_parity_through_the_cluster(ray_cluster, adapter_dirs):
    """The gRPC front on the ingress: every loraplex.v1 method forwarded, with the same answers,
    statuses and metadata as python -m server's."""
    import grpc

    from server.api.grpc.pb import adapters_pb2, adapters_pb2_grpc, inference_pb2 as ipb, inference_pb2_grpc
    from server.cluster.app import GRPC_METHODS
    from tests.integration.test_grpc import files_stream

    declared = {f"/{s.full_name}/{m.name}": f"{'stream' if m.client_streaming else 'unary'}_"
                                            f"{'stream' if m.server_streaming else 'unary'}"
                for pb in (ipb, adapters_pb2) for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert GRPC_METHODS == declared
    auth = (("authorization", f"Bearer {ray_cluster.keys['alice']}"),)
    with grpc.insecure_channel(f"127.0.0.1:{ray_cluster.grpc_port}") as channel:
        inference, adapters = inference_pb2_grpc.InferenceStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        made = adapters.Upload(files_stream("over-grpc", adapter_dirs["a3"]), metadata=auth)
        assert made.version == 1 and made.model == "tiny:over-grpc"
        assert "tiny:over-grpc" in {m.id for m in inference.ListModels(ipb.ListModelsRequest(), metadata=auth).models}
        call = inference.Generate(ipb.GenerateRequest(model="tiny:over-grpc", prompt="the date is", max_tokens=8,
                                                      temperature=0, ignore_eos=True), metadata=auth)
        messages = list(call)
        assert dict(call.initial_metadata())["x-loraplex-replica"]
        ids = [t for m in messages for t in m.token_ids]
        over_http = complete(ray_cluster, "tiny:over-grpc")
        assert ids == tokens(over_http) and len(ids) == 8
        assert messages[-1].usage.completion_tokens == 8
        with pytest.raises(grpc.RpcError) as e:
            list(inference.Generate(ipb.GenerateRequest(model="tiny:absent", prompt="x", max_tokens=1), metadata=auth))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "model" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            inference.ListModels(ipb.ListModelsRequest())
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:  # bob cannot see alice's adapter through either front
            adapters.Get(adapters_pb2.AdapterRef(name="over-grpc"),
                         metadata=(("authorization", f"Bearer {ray_cluster.keys['bob']}"),))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert adapters.Delete(adapters_pb2.AdapterRef(name="over-grpc"), metadata=auth)
        assert complete(ray_cluster, "tiny:over-grpc").status_code == 404
