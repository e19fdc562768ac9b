"""TLS on both fronts, then a graceful drain on SIGTERM -- one real server, started for this module.

TLS: a self-signed certificate made here; the stock ``openai`` client and a grpcio secure
channel trust it, plaintext clients are refused. Drain: at SIGTERM ``/ready`` and gRPC health
say no at once and new requests get 503 on both fronts; a stream that ends within
``--shutdown-grace-s`` finishes normally, a longer one ends with a final error event (HTTP) or
UNAVAILABLE (gRPC); then the process exits 0.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import signal
import threading
import time

import grpc
import httpx
import pytest

from server.api.grpc.pb import inference_pb2 as ipb
from server.api.grpc.pb import inference_pb2_grpc
from tests.integration.server_proc import ServerProcess, create_tenant, free_port

GRACE_S = 2


def _self_signed(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraplex-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return certfile, keyfile


@pytest.fixture(scope="module")
def tls(tiny_base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    certfile, keyfile = _self_signed(tmp)
    data = tmp / "data"
    key = create_tenant(data, "alice")
    grpc_port, metrics_port = free_port(), free_port()
    server = ServerProcess(tiny_base, data, "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile),
                           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                           "--shutdown-grace-s", str(GRACE_S), log=tmp / "server.log")
    server.scheme, server.verify = "https", str(certfile)
    server.start()
    yield server, key, certfile, grpc_port, metrics_port
    server.stop()


def _https(server, key):
    return httpx.Client(base_url=server.url, verify=server.verify, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})


def _secure_channel(port, certfile):
    return grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(certfile.read_bytes()))


def test_https_and_grpc_over_tls(tls):
    from openai import OpenAI

    server, key, certfile, grpc_port, metrics_port = tls
    client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0,
                    http_client=httpx.Client(verify=str(certfile)))
    text = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0).choices[0].text
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port gets no answer
        httpx.get(f"http://127.0.0.1:{server.port}/ready", timeout=5).raise_for_status()
    with _secure_channel(grpc_port, certfile) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        got = "".join(r.text for r in stub.Generate(
            ipb.GenerateRequest(model="tiny", prompt="hello", max_tokens=4, temperature=0),
            metadata=(("authorization", f"Bearer {key}"),), timeout=60))
    assert got == text
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as plain:
        with pytest.raises(grpc.RpcError) as e:
            list(inference_pb2_grpc.InferenceStub(plain).Generate(
                ipb.GenerateRequest(model="tiny", prompt="hello", max_tokens=4),
                metadata=(("authorization", f"Bearer {key}"),), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "loraplex_requests_total" in httpx.get(f"https://127.0.0.1:{metrics_port}/metrics",
                                                  verify=str(certfile)).text


def _stream(server, key, max_tokens: int, n: int, out: dict, started: threading.Event) -> None:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "n": n, "temperature": 1.0}
    events = []
    with _https(server, key) as h, h.stream("POST", "/v1/completions", json=body) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()
    out["events"] = events


def _slow_stream(server, key, out: dict, started: threading.Event, fast: threading.Event) -> None:
    """A client slower than any engine until ``fast`` is set: a 4 KiB receive window, 512 bytes
    read every 20 ms, for a stream (128 choices x 240 tokens, ~7 MB of events) larger than the
    server's socket buffers. So on any host the request is still in flight when the grace ends;
    then the client reads the rest at once."""
    import socket
    import ssl

    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 240, "stream": True, "ignore_eos": True,
                       "n": 128, "temperature": 1.0}).encode()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    context = ssl.create_default_context(cafile=server.verify)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := s.recv(512 if not fast.is_set() else 1 << 20):
            data += chunk
            started.set()
            if not fast.is_set():
                time.sleep(0.02)
    head, _, rest = data.partition(b"\r\n\r\n")
    out["status"] = int(head.split()[1])
    text = _dechunk(rest).decode(errors="replace")
    out["events"] = [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def _dechunk(body: bytes) -> bytes:
    out, i = b"", 0
    while i < len(body):
        j = body.index(b"\r\n", i)
        size = int(body[i:j], 16)
        if size == 0:
            break
        out += body[j + 2:j + 2 + size]
        i = j + 2 + size + 2
    return out


def test_sigterm_drains_both_fronts_then_exits_0(tls):
    server, key, certfile, grpc_port, _ = tls
    long_out, short_out, grpc_out = {}, {}, {}
    long_started, short_started, grpc_started = threading.Event(), threading.Event(), threading.Event()
    fast = threading.Event()  # set once the grace is over: the slow clients then read what is left
    long_t = threading.Thread(target=_slow_stream, args=(server, key, long_out, long_started, fast))
    long_t.start()
    assert long_started.wait(60)

    def grpc_stream():
        # A 64 KiB HTTP/2 window that never grows, read slowly: in flight past the grace too.
        options = (("grpc.http2.bdp_probe", 0),)
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", grpc.ssl_channel_credentials(certfile.read_bytes()),
                                 options) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            call = stub.Generate(ipb.GenerateRequest(model="tiny", prompt="hello", max_tokens=240, ignore_eos=True,
                                                     n=64, temperature=1.0),
                                 metadata=(("authorization", f"Bearer {key}"),), timeout=120)
            try:
                for _ in call:
                    grpc_started.set()
                    if not fast.is_set():
                        time.sleep(0.02)
                grpc_out["code"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                grpc_out["code"], grpc_out["details"] = e.code(), e.details()

    grpc_t = threading.Thread(target=grpc_stream)
    grpc_t.start()
    assert grpc_started.wait(60)
    short_t = threading.Thread(target=_stream, args=(server, key, 4, 1, short_out, short_started))
    short_t.start()
    assert short_started.wait(60)

    server.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    while httpx.get(f"{server.url}/ready", verify=server.verify, timeout=5).status_code != 503:
        assert time.time() - t0 < 2, "/ready did not flip at SIGTERM"
        time.sleep(0.05)
    with _https(server, key) as h:
        r = h.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
        assert int(r.headers["retry-after"]) >= 1
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _secure_channel(grpc_port, certfile) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as e:  # or the listener already refuses new calls
            assert e.code() == grpc.StatusCode.UNAVAILABLE

    short_t.join(60)
    time.sleep(max(0.0, t0 + GRACE_S + 2 - time.time()))  # past the grace: the server has cut the rest
    fast.set()
    for t in (long_t, grpc_t):
        t.join(60)
    # The short stream finished on its own, within the grace.
    assert short_out["status"] == 200 and short_out["events"][-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in short_out["events"][:-1] for c in json.loads(e).get("choices", [])]
    assert finishes.count("length") == 1
    # The long one ran past it and ended with a final error event, then [DONE].
    assert long_out["status"] == 200 and long_out["events"][-1] == "[DONE]"
    last = json.loads(long_out["events"][-2])
    assert last["error"]["code"] == "server_shutting_down" and last["status"] == 503
    assert grpc_out["code"] == grpc.StatusCode.UNAVAILABLE and "shut" in grpc_out["details"]
    assert server.proc.wait(timeout=GRACE_S + 30) == 0
    assert time.time() - t0 < GRACE_S + 25
